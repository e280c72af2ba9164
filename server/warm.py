"""The coordinator's warm ServerApp runner: its own SuperExec, for its one run.

Why this exists: by default (``flower-superlink --isolation subprocess``) the SuperLink starts
a SuperExec that asks it for tasks every poll interval for as long as it lives (at 0.1 s that
was the SuperLink's largest CPU cost during the rounds, on cores the demo's sites train on)
and, once the run is submitted, starts a fresh ``flwr-serverapp`` interpreter that only then
imports torch, scikit-learn and fedmed (7 s on this 2-core machine, before round 1 can start).
``fedmed-server`` instead runs the SuperLink with ``--isolation process`` (Flower's mode for a
SuperExec started outside it) and starts this runner beside it. The runner imports the
ServerApp's code while the SuperLink starts and the run is submitted, takes the run's task as
the SuperExec would, runs it here with Flower's own ``run_serverapp`` (what ``flwr-serverapp``
runs) and exits with the ServerApp's exit code: no polling once the run has started, no second
interpreter. Its output is the run's console (``fedmed-server`` reads it instead of ``flwr log``).

The Flower internals it needs are in :mod:`fedmed.server.flower_compat`. The runner checks them
first (before the heavy imports); when this Flower lacks one it exits with
:data:`RUNNER_UNSUPPORTED` and ``fedmed-server`` starts Flower's own SuperExec instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "wait_for_task", "RUNNER_UNSUPPORTED"]

POLL = 0.05  # seconds between asks until the run's task is there (only before the run starts)
RUNNER_UNSUPPORTED = 3  # exit code: this Flower lacks what the runner needs (fedmed-server falls back)


def _gone(pid: int | None) -> bool:
    """Whether process ``pid`` has exited (Linux also SIGTERMs the runner then: the other systems' guard)."""
    try:
        if pid is not None:
            os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def wait_for_task(address: str, *, root_certificates: bytes | None, timeout: float,
                  parent_pid: int | None = None) -> str:
    """Ask the SuperLink for a ServerApp task until one is there; its token.

    Connection errors are retried until ``timeout``: the runner starts with the SuperLink.
    It gives up when ``parent_pid`` (the ``fedmed-server`` that started it) is gone.
    """
    from fedmed.server import flower_compat

    deadline = time.monotonic() + timeout
    client: flower_compat.RuntimeClient | None = None
    last = ""
    try:
        while time.monotonic() <= deadline:
            try:
                client = client or flower_compat.RuntimeClient(address, root_certificates=root_certificates)
                token = flower_compat.acquire_serverapp_task(client)
                if token is not None:
                    return token
            except Exception as exc:  # the SuperLink may still be starting
                last = f" (last: {type(exc).__name__})"
            if _gone(parent_pid):
                raise TimeoutError(f"its fedmed-server (pid {parent_pid}) is gone")
            time.sleep(POLL)
        raise TimeoutError(f"no run reached this runner from the SuperLink at {address} in {timeout:.0f}s{last}")
    finally:
        if client is not None:
            client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmed.server.warm", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperLink's Runtime API host:port")
    p.add_argument("--root-certificates", type=Path, help="CA of the SuperLink's loopback TLS (none: plain HTTP)")
    p.add_argument("--parent-pid", type=int, help="exit when this process (fedmed-server) is gone")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the run")
    a = p.parse_args(argv)
    from fedmed.server import flower_compat

    problem = flower_compat.check_runner()
    if problem is not None:
        print(f"fedmed warm runner: this Flower lacks what it needs ({problem}); Flower's SuperExec runs "
              "the ServerApp instead", file=sys.stderr, flush=True)
        return RUNNER_UNSUPPORTED
    # The ServerApp's code is imported now, while the SuperLink starts and the run is submitted.
    import fedmed.server.app  # noqa: F401  (pyflakes: imported for its side effect)

    ca = a.root_certificates.read_bytes() if a.root_certificates else None
    try:
        token = wait_for_task(a.runtime_api_address, root_certificates=ca, timeout=a.timeout,
                              parent_pid=a.parent_pid)
    except TimeoutError as exc:
        print(f"fedmed warm runner: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        flower_compat.run_serverapp(a.runtime_api_address, token, root_certificates=ca, parent_pid=a.parent_pid)
    except SystemExit as done:  # Flower's exit: its handlers have pushed the run's status and logs
        _exit_now(done.code)
    return 0  # run_serverapp exits the process with the ServerApp's code; not reached


def _exit_now(code: object) -> None:
    """Leave without the interpreter's teardown, once the run's files and status are out.

    Unwinding torch, scikit-learn and MLflow's modules took 2.5 s here after every run (the
    federation's wall waited on it); nothing is left to write by then: the ServerApp's files
    are closed, its tracker ended, and Flower's exit handlers pushed the status (Flower's own
    exit also ends with ``os._exit`` when its graceful exit stalls).
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
