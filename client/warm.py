"""A warm ClientApp runner: one long-lived process executes every task the SuperNode gets.

Why this exists: Flower's SuperNode (``--isolation subprocess``) starts a fresh
``flwr-clientapp`` process for every message. At a hospital each such start re-imports
torch/torchvision/sklearn (5–10 s on a small CPU box) and re-reads and re-decodes the
site's data, twice per round (train and evaluate). Flower 1.42 offers no long-lived
ClientApp runner (its warm executors are one-task Kubernetes pods), so fedmed starts the
SuperNode with ``--isolation process`` and runs this loop beside it: it acquires tasks from
the node's Runtime API as Flower's SuperExec does and runs them in this process, keeping
imports, decoded data and the model (:mod:`fedmed.client.site`'s cache) warm.

Every Flower internal it uses lives in :mod:`fedmed.client.flower_compat`, checked at
start-up. Before an app is installed the runner checks it is the fedmed app
(:mod:`fedmed.client.approval`); every failure outside the app leaves as a fixed code and
a reference (:mod:`fedmed.client.refusals`), the details stay in this site's log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from fedmed.client import flower_compat
from fedmed.client.approval import AppRefused, check_fab
from fedmed.client.marks import RUNNER_CANNOT, RUNNER_READY
from fedmed.client.refusals import log_internal, log_refusal, run_app_safely
from fedmed.errors import freeze_at_exit

__all__ = ["preload", "serve", "run_task"]

log = logging.getLogger("fedmed.client")


def run_task(address: str, token: str, apps: dict[str, ClientApp]) -> bool:
    """Run one acquired task in this process; True when the app produced its reply."""
    conn = flower_compat.RuntimeConnection(address, component="flwr-clientapp", token=token)
    task: flower_compat.TaskInput | None = None
    reply: Message | None = None
    completed, details = False, "fedmed: task failed (see the site's log)"
    t0 = time.perf_counter()
    try:
        with conn.heartbeat():
            task = conn.pull_task_input()
            t_in = time.perf_counter() - t0
            app = apps.get(task.fab_hash)
            if app is None:
                check_fab(task.fab_content)  # before anything from the FAB is installed or imported
                app = apps[task.fab_hash] = flower_compat.load_client_app(task)
            t1 = time.perf_counter()
            reply = run_app_safely(app, task.message, task.context)
            completed = not reply.has_error()
            details = (reply.error.reason or "") if reply.has_error() else ""
            log.info("%s task: input %.2fs, app %.2fs", task.message.metadata.message_type, t_in,
                     time.perf_counter() - t1)
    except AppRefused as exc:
        code, details = log_refusal(exc)
        if task is not None:
            reply = Message(Error(code=code, reason=details), reply_to=task.message)
    except Exception as ex:  # outside the app (Runtime API, install, load): code + ref only
        code, details = log_internal("running a task", ex)
        if task is not None:
            reply = Message(Error(code=code, reason=details), reply_to=task.message)
    finally:
        context = task.context if task is not None else None
        try:
            if reply is not None and context is not None:
                conn.push_reply(reply, context)
        finally:
            conn.push_status(context, completed=completed, details=details)
            log.info("task done in %.2fs (%s)", time.perf_counter() - t0, "completed" if completed else "failed")
            conn.close()
    return completed


def serve(address: str, *, poll: float = 0.2, stop: threading.Event | None = None) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at ``address`` until ``stop`` is set."""
    stop = stop or threading.Event()
    conn = flower_compat.RuntimeConnection(address, component="SuperExec")
    apps: dict[str, ClientApp] = {}
    try:
        while not stop.is_set():
            token = conn.acquire_task()
            if token is not None:
                run_task(address, token, apps)
                continue  # a round often sends the next message right away
            stop.wait(poll)
    finally:
        conn.close()


def preload(*, images: bool) -> None:
    """Import what the ClientApp needs before the first task, not during a round: the app,
    and with ``images`` torchvision's augmentation (fedmed.data loads it only for image sites)."""
    if images:
        import torchvision.transforms.v2  # noqa: F401

    import fedmed.client.app  # noqa: F401  (pyflakes: imported for its side effect)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmed.client.warm", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API host:port")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between task polls when idle")
    p.add_argument("--no-images", action="store_true",
                   help="this site holds no images: do not import the image augmentation ahead of the tasks")
    a = p.parse_args(argv)
    freeze_at_exit()  # a run's end waits on this process's exit
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    problem = flower_compat.check_warm()
    if problem is not None:  # fedmed-client then falls back to Flower's gated per-task process
        print(f"fedmed warm runner: this Flower lacks what it needs ({problem})", file=sys.stderr, flush=True)
        return RUNNER_CANNOT
    print(RUNNER_READY, flush=True)  # fedmed-client starts the node on this line
    preload(images=not a.no_images)

    deadline = time.monotonic() + 60
    while True:
        try:
            serve(a.runtime_api_address, poll=a.poll)
            return 0
        except KeyboardInterrupt:
            return 0
        except Exception as ex:  # the node may still be starting: retry for a minute
            if time.monotonic() > deadline:
                print(f"fedmed warm runner: cannot reach the node at {a.runtime_api_address}: "
                      f"{type(ex).__name__}", file=sys.stderr)
                return 1
            time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
