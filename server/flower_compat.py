"""The coordinator's uses of Flower internals, in one module, checked where they are applied.

1. **Reply pulls.** Flower's ``HttpGrid`` (the ServerApp's link to the SuperLink) pulls a
   reply's objects with ``flwr.supercore.constant.PULL_INITIAL_BACKOFF``: 1 s, doubling to
   10 s. A site's node uploads a reply as its message first, then its objects, so a pull that
   lands between the two (the likelier the sooner the server asks) waited about a second for
   objects that arrive milliseconds later, on every round (docs/benchmarks.md).
   :func:`shorten_reply_pulls` gives that one call the backoff fedmed's site runner uses for
   the same kind of wait (:meth:`fedmed.client.flower_compat.RuntimeConnection.pull_task_input`):
   0.05 s doubling to 0.5 s. What is pulled, and every check on it, stays Flower's.
2. **The warm ServerApp runner** (:mod:`fedmed.server.warm`): Flower 1.42 runs a ServerApp
   through a SuperExec that asks for tasks every poll interval for as long as it lives and
   starts a fresh ``flwr-serverapp`` interpreter per run. :func:`acquire_serverapp_task` and
   :func:`run_serverapp` are the two halves of that pair (the SuperExec's ``AcquireTask`` and
   the body of ``flwr-serverapp``), so the runner can take the task and run it in a process
   that imported the ServerApp's code beforehand. :func:`check_runner` says whether this
   Flower still has them; ``fedmed-server`` otherwise keeps Flower's SuperExec.

The client side keeps its own internals in :mod:`fedmed.client.flower_compat` (the roles do
not import each other).
"""

from __future__ import annotations

import functools
import importlib
import inspect

from fedmed.flower import first_missing
from fedmed.flower import flower_internal as _get

__all__ = ["shorten_reply_pulls", "PULL_BACKOFF", "PULL_BACKOFF_CAP", "check_runner", "acquire_serverapp_task",
           "run_serverapp", "RuntimeClient"]

PULL_BACKOFF, PULL_BACKOFF_CAP = 0.05, 0.5
_GRID = "flwr.superlink.grid.http_grid"  # HttpGrid.pull_messages calls this module's pull_objects


def shorten_reply_pulls() -> str | None:
    """Shorten the HttpGrid's object-pull backoff; None when applied, else why not (unchanged).

    Applied once per process (a second call finds it done); the simulation's in-memory grid
    pulls no objects and is not affected.
    """
    try:
        mod = importlib.import_module(_GRID)
        fn = getattr(mod, "pull_objects", None)
        if fn is None:
            return f"{_GRID}.pull_objects is missing"
        if isinstance(fn, functools.partial) and fn.keywords.get("initial_backoff") == PULL_BACKOFF:
            return None
        params = inspect.signature(fn).parameters
        if not {"initial_backoff", "backoff_cap"} <= set(params):
            return f"{_GRID}.pull_objects no longer takes initial_backoff/backoff_cap"
        mod.pull_objects = functools.partial(fn, initial_backoff=PULL_BACKOFF,  # type: ignore[attr-defined]
                                             backoff_cap=PULL_BACKOFF_CAP)
    except Exception as exc:  # noqa: BLE001 - any surprise: Flower's grid as it is (slower, correct)
        return f"self-check raised {type(exc).__name__}: {exc}"
    return None


# (module, attribute) pairs the warm ServerApp runner uses; a test adds to them through the
# environment to play a Flower release that removed one (FEDMED_SERVER_COMPAT_REQUIRE).
_RUNNER_NEEDS = [
    ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    ("flwr.supercore.constant", "TaskType"),
    ("flwr.common.constant", "ISOLATION_MODE_PROCESS"),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    ("flwr.supercore.runtime", "RuntimeHttpClient"),
    ("flwr.supercore.logger", "mirror_output_to_queue"),
    ("flwr.supercore.logger", "restore_output"),
    ("flwr.superlink.runtime", "run_serverapp"),
]


def check_runner() -> str | None:
    """None when this Flower has what :mod:`fedmed.server.warm` needs, else the first thing missing."""
    try:
        if (problem := first_missing(_RUNNER_NEEDS, "FEDMED_SERVER_COMPAT_REQUIRE")) is not None:
            return problem
        if _get("flwr.common.constant", "ISOLATION_MODE_PROCESS") != "process":
            return "flower-superlink no longer calls its external-SuperExec mode 'process'"
        if not hasattr(_get("flwr.supercore.constant", "TaskType"), "SERVER_APP"):
            return "flwr.supercore.constant.TaskType.SERVER_APP is missing"
        want = {"runtime_api_address", "log_queue", "token", "insecure", "certificates", "parent_pid",
                "runtime_dependency_install"}
        if not want <= set(inspect.signature(_get("flwr.superlink.runtime", "run_serverapp")).parameters):
            return "flwr.superlink.runtime.run_serverapp takes other arguments"
        if not {"server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"} <= set(
                inspect.signature(_get("flwr.supercore.runtime", "RuntimeHttpClient").from_server_address).parameters):
            return "flwr.supercore.runtime.RuntimeHttpClient.from_server_address takes other arguments"
    except Exception as exc:  # noqa: BLE001 - any surprise: Flower's own SuperExec instead
        return f"self-check raised {type(exc).__name__}: {exc}"
    return None


class RuntimeClient:
    """A SuperExec's client of the SuperLink's Runtime API (loopback; TLS when the link has it)."""

    def __init__(self, address: str, *, root_certificates: bytes | None) -> None:
        retry = _get("flwr.supercore.retry", "make_simple_http_retry_invoker")()
        retry.max_tries = 1  # the runner retries itself, within its deadline (Flower's would retry forever)
        self._client = _get("flwr.supercore.runtime", "RuntimeHttpClient").from_server_address(
            server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
            interceptors=[_get("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor")(
                component_name="SuperExec")],
            retry_invoker=retry)

    def close(self) -> None:
        self._client.close()


def acquire_serverapp_task(client: RuntimeClient) -> str | None:
    """The token of a ServerApp task waiting at the SuperLink, or None (the SuperExec's ask)."""
    req = _get("flwr.proto.runtime_pb2", "AcquireTaskRequest")(
        supported_task_types=[_get("flwr.supercore.constant", "TaskType").SERVER_APP], agentapp_fab_hashes=[])
    res = client._client.AcquireTask(req)
    return str(res.token) if res.HasField("task") and res.token else None


def run_serverapp(address: str, token: str, *, root_certificates: bytes | None, parent_pid: int | None) -> None:
    """Run the task ``token`` names in this process, as ``flwr-serverapp`` does (it exits the process).

    Flower's body: pull the run, install the (code-free) FAB, load and run the ServerApp over an
    HttpGrid, push the final status, then ``sys.exit`` with the ServerApp's exit code. Output is
    mirrored to the SuperLink's run log as ``flwr-serverapp`` does (``flwr log`` keeps working).
    """
    from queue import Queue

    queue: Queue[str | None] = Queue()
    _get("flwr.supercore.logger", "mirror_output_to_queue")(queue)
    try:
        _get("flwr.superlink.runtime", "run_serverapp")(
            runtime_api_address=address, log_queue=queue, token=token, insecure=root_certificates is None,
            certificates=root_certificates, parent_pid=parent_pid, runtime_dependency_install=False)
    finally:
        _get("flwr.supercore.logger", "restore_output")()
