"""Every use fedmed makes of Flower's internals, in one module, checked at start-up.

fedmed needs three things Flower 1.42 has no public API for (it offers no long-lived
ClientApp process: its "warm executors" are one-task Kubernetes pods):

* the **warm runner** (:mod:`fedmed.client.warm`): acquire a SuperNode's ClientApp tasks
  over its Runtime API and run them in one process, as Flower's SuperExec +
  ``flwr-clientapp`` pair does, but keeping imports, data and model loaded between rounds;
* the **app gate** of the fallback: Flower's own ``flwr-clientapp`` (``--isolation
  subprocess``) with fedmed's FAB check run before it installs the FAB;
* the **node's idle poll** (:func:`run_supernode`): an idle SuperNode sleeps a hard-coded 3 s
  between asks for messages (and 0.5 s between looks for a reply), with no setting for it,
  so every message of every round waited 1.5 s on average before a site saw it; and it
  fetches a message's objects with a 1 s first backoff.

:func:`check_warm` / :func:`check_gate` / :func:`check_node_poll` import and exercise what
each needs and return a reason when a Flower release has moved it. The warm runner and the
node run their checks when they start (``fedmed-client`` itself imports no Flower); the site
then falls back to the gate (or to Flower's unchanged node), or refuses to start
(:mod:`fedmed.client.cli`).
Nothing else in fedmed imports ``flwr.supercore``, ``flwr.proto``, ``flwr.supernode`` or
``flwr.common.serde``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from fedmed.flower import first_missing
from fedmed.flower import flower_internal as _get

__all__ = [
    "check_warm",
    "check_gate",
    "TaskInput",
    "RuntimeConnection",
    "load_client_app",
    "run_gated_clientapp",
    "CLIENTAPP_COMMAND",
    "wire_bytes",
    "check_node_poll",
    "run_supernode",
    "LOCAL_WAIT",
    "OBJECT_BACKOFF",
]

CLIENTAPP_COMMAND = "flwr-clientapp"  # what Flower's SuperExec launches per task, found on PATH

# (module, attribute) pairs the warm runner uses. Tests add to these through the
# environment to play a Flower release that removed one (FEDMED_COMPAT_REQUIRE[_GATE]).
_WARM_NEEDS = [
    ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    ("flwr.proto.runtime_pb2", "PullAppMessagesRequest"),
    ("flwr.proto.runtime_pb2", "PullTaskInputRequest"),
    ("flwr.proto.node_pb2", "Node"),
    ("flwr.supercore.constant", "TaskType"),
    ("flwr.supercore.heartbeat", "HeartbeatSender"),
    ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    ("flwr.supercore.runtime", "RuntimeHttpClient"),
    ("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_confirm_message_received_fn_protobuf"),
    ("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_pull_object_fn_protobuf"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree"),
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.supernode.runtime.run_clientapp", "push_message"),
    ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
    ("flwr.common.serde", "context_from_proto"),
    ("flwr.common.serde", "context_to_proto"),
    ("flwr.common.serde", "fab_from_proto"),
    ("flwr.common.serde", "run_from_proto"),
    ("flwr.common.constant", "SubStatus"),
    ("flwr.cli.install", "install_from_fab"),
    ("flwr.clientapp.utils", "get_load_client_app_fn"),
    ("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
]
_GATE_NEEDS = [
    ("flwr.supernode.runtime.run_clientapp", "run_clientapp"),
    ("flwr.supernode.runtime.run_clientapp", "install_from_fab"),
    ("flwr.supernode.runtime.run_clientapp", "get_load_client_app_fn"),
    ("flwr.supernode.cli", "flwr_clientapp"),
    ("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND"),
    ("flwr.supercore.constant", "TaskType"),
]


def _params(fn: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(fn).parameters)


def check_warm() -> str | None:
    """None when this Flower has what the warm runner needs, else the first thing missing."""
    try:
        if (problem := first_missing(_WARM_NEEDS, "FEDMED_COMPAT_REQUIRE")) is not None:
            return problem
        want = {
            "pull_and_inflate_object_from_tree": (
                _get("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree"),
                {"initial_backoff", "backoff_cap", "max_tries_per_object", "return_type"}),
            "push_message": (_get("flwr.supernode.runtime.run_clientapp", "push_message"),
                             {"client", "message", "context"}),
            "push_task_output": (_get("flwr.supernode.runtime.run_clientapp", "push_task_output"),
                                 {"client", "context", "sub_status", "details"}),
            "get_load_client_app_fn": (_get("flwr.clientapp.utils", "get_load_client_app_fn"),
                                       {"default_app_ref", "app_path", "multi_app"}),
            "RuntimeHttpClient.from_server_address": (
                _get("flwr.supercore.runtime", "RuntimeHttpClient").from_server_address,
                {"server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"}),
        }
        for name, (fn, params) in want.items():
            if not params <= _params(fn):
                return f"{name} no longer takes {sorted(params - _params(fn))}"
        client_cls = _get("flwr.supercore.runtime", "RuntimeHttpClient")
        for rpc in ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
                    "close"):
            if not callable(getattr(client_cls, rpc, None)):
                return f"RuntimeHttpClient.{rpc} is missing"
        fields = _get("flwr.proto.runtime_pb2", "AcquireTaskRequest").DESCRIPTOR.fields_by_name
        if not {"supported_task_types", "agentapp_fab_hashes"} <= set(fields):
            return "AcquireTaskRequest changed its fields"
        _get("flwr.supercore.constant", "TaskType").CLIENT_APP  # noqa: B018 (raises if gone)
        # Behaviour: a received message's id is set the way Flower's own runner sets it.
        meta = Metadata(run_id=7, message_id="", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
        # metadata= is what Flower's runner passes; Message's public overloads leave it out
        msg = Message(RecordDict(), metadata=meta)  # type: ignore[call-overload]
        _set_message_id(msg, "fedmed-compat-check")
        if msg.metadata.message_id != "fedmed-compat-check":
            return "Message metadata no longer keeps its id where Flower's runner sets it"
        # Behaviour: a Context survives the Runtime API's proto round trip.
        ctx = Context(run_id=7, node_id=3, node_config={"site": "x"}, state=RecordDict(), run_config={"k": 1})
        back = _get("flwr.common.serde", "context_from_proto")(_get("flwr.common.serde", "context_to_proto")(ctx))
        if (back.run_id, back.node_id, dict(back.node_config), dict(back.run_config)) != (7, 3, {"site": "x"},
                                                                                        {"k": 1}):
            return "Context no longer round-trips through the Runtime API's protobuf"
    except Exception as exc:  # any surprise means: do not trust the warm runner
        return f"self-check raised {type(exc).__name__}: {exc}"
    return None


def check_gate() -> str | None:
    """None when Flower's ``flwr-clientapp`` can run with fedmed's FAB check first, else why not.

    The gate replaces the ``install_from_fab`` that ``run_clientapp`` looks up in its module
    and is only reached because SuperExec launches ``flwr-clientapp`` by name (PATH).
    """
    try:
        if (problem := first_missing(_GATE_NEEDS, "FEDMED_COMPAT_REQUIRE_GATE")) is not None:
            return problem
        run_clientapp = _get("flwr.supernode.runtime.run_clientapp", "run_clientapp")
        for name in ("install_from_fab", "get_load_client_app_fn"):
            if name not in run_clientapp.__code__.co_names:
                return f"flwr-clientapp no longer calls {name}"
        commands = _get("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND")
        if commands.get(_get("flwr.supercore.constant", "TaskType").CLIENT_APP) != CLIENTAPP_COMMAND:
            return f"SuperExec no longer launches {CLIENTAPP_COMMAND} by name"
    except Exception as exc:
        return f"self-check raised {type(exc).__name__}: {exc}"
    return None


_NODE_LOOP = "flwr.supernode.start_client_internal"  # the SuperNode's pull/push loop
_NODE_CLI = ("flwr.supernode.cli", "flower_supernode")  # the flower-supernode console script


def check_node_poll() -> str | None:
    """None when the SuperNode's idle sleeps can be shortened by :func:`run_supernode`, else why not.

    The loop must still take its sleeps from the ``time`` module it imported (that is what
    is swapped) and still sleep 3 s when idle (else there is nothing to shorten).
    """
    try:
        if (problem := first_missing([(_NODE_LOOP, "start_client_internal"), _NODE_CLI],
                                "FEDMED_COMPAT_REQUIRE_POLL")) is not None:
            return problem
        mod = importlib.import_module(_NODE_LOOP)
        if getattr(mod, "time", None) is not time:
            return f"{_NODE_LOOP} no longer sleeps through the time module"
        if "time.sleep(3)" not in inspect.getsource(mod.start_client_internal):
            return "the SuperNode no longer sleeps 3 s when idle"
        pull = getattr(mod, "pull_objects", None)
        if pull is None or not {"initial_backoff", "backoff_cap"} <= set(inspect.signature(pull).parameters):
            return f"{_NODE_LOOP}.pull_objects no longer takes initial_backoff/backoff_cap"
    except Exception as exc:  # noqa: BLE001 - any surprise: run Flower's node as it is
        return f"self-check raised {type(exc).__name__}: {exc}"
    return None


LOCAL_WAIT = 0.02  # the node's waits on its own in-memory state (no request): look every 20 ms


class _CappedSleep:
    """The ``time`` module with every ``sleep`` capped: at ``cap`` s, and at ``local`` s below 1 s.

    Flower's node sleeps 3 s when idle, before asking the SuperLink again (a request: capped
    at ``cap``), and 0.5 s while it waits for a reply, or an object's content, to appear in
    its own in-memory state (a look at a dict: capped at ``local``). The reply wait sits
    between a site's finished training and its upload, so every round waited it out.
    """

    def __init__(self, cap: float, *, local: float = LOCAL_WAIT) -> None:
        self.cap, self.local = cap, min(local, cap)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap if seconds >= 1.0 else self.local))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.05, 0.5  # the node's object pulls (Flower's: 1 s doubling to 10 s)


def _patch_node_loop(poll: float) -> None:
    """Cap the node loop's sleeps (:class:`_CappedSleep`) and shorten its object-pull backoff.

    The server uploads a message, then its objects; a node that asks in between waited
    Flower's first 1 s backoff for objects that arrive milliseconds later.
    """
    mod = importlib.import_module(_NODE_LOOP)
    mod.time = _CappedSleep(poll)  # type: ignore[attr-defined]
    pull = mod.pull_objects
    if not isinstance(pull, functools.partial):
        mod.pull_objects = functools.partial(  # type: ignore[attr-defined]
            pull, initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP)


def run_supernode(argv: list[str], *, poll: float) -> None:
    """``flower-supernode ARGV`` in this process, its idle sleeps capped at ``poll`` seconds
    and its waits on its own state at :data:`LOCAL_WAIT` (:class:`_CappedSleep`).

    Only the waits change (Flower's loop asks again sooner); what it pulls, stores and
    pushes is Flower's own. When :func:`check_node_poll` finds the loop moved, the node
    runs unchanged (slower, still correct).
    """
    if check_node_poll() is None:
        _patch_node_loop(poll)
    sys.argv = ["flower-supernode", *argv]
    _get(*_NODE_CLI)()


def wire_bytes(msg: Message) -> int:
    """Bytes of the serialised objects Flower pushes for this message (HTTP framing aside)."""
    nested = _get("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects")(msg)
    return int(sum(len(obj.deflate()) for obj in nested.values()))


def _set_message_id(message: Message, message_id: str) -> None:
    # A pulled message does not carry its own id (its object id); Flower's own runner
    # (flwr.supernode.runtime.run_clientapp.pull_task_input) sets it exactly so.
    message.metadata.__dict__["_message_id"] = message_id


@dataclass
class TaskInput:
    """What one ClientApp task needs: the message, its context and the run's FAB."""

    message: Message
    context: Context
    fab_id: str
    fab_version: str
    fab_hash: str
    fab_content: bytes


class RuntimeConnection:
    """A client of a SuperNode's Runtime API (loopback, no TLS on that hop)."""

    def __init__(self, address: str, *, component: str, token: str | None = None) -> None:
        interceptors = [_get("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor")(component_name=component)]
        if token is not None:
            interceptors.append(_get("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor")(token))
        self._client = _get("flwr.supercore.runtime", "RuntimeHttpClient").from_server_address(
            server_address=address, insecure=True, root_certificates=None, interceptors=interceptors,
            retry_invoker=_get("flwr.supercore.retry", "make_simple_http_retry_invoker")())

    def acquire_task(self) -> str | None:
        """The token of a new ClientApp task, or None when there is none."""
        TaskType = _get("flwr.supercore.constant", "TaskType")
        req = _get("flwr.proto.runtime_pb2", "AcquireTaskRequest")(
            supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
        res = self._client.AcquireTask(req)
        return res.token if res.HasField("task") and res.token else None

    def pull_task_input(self, *, backoff: float = 0.05, cap: float = 0.1) -> TaskInput:
        """Flower's ``pull_task_input`` with a short retry backoff.

        The node announces a task before it has fetched the message's objects from the
        SuperLink; Flower's default backoff (1 s doubling to 10 s) then idles the site for
        tens of seconds per message on a loopback link. Objects on the node's own port are
        cheap to re-ask for, so poll them quickly instead (at most 0.1 s apart: on a busy
        machine that fetch took ~1 s a round, and a 0.5 s cap left the site idle half of it).
        """
        serde = importlib.import_module("flwr.common.serde")
        pb = importlib.import_module("flwr.proto.runtime_pb2")
        inflatable = importlib.import_module("flwr.supercore.inflatable.inflatable_protobuf_utils")
        c = self._client
        res = c.PullTaskInput(pb.PullTaskInputRequest())
        ident = _get("flwr.supercore.task_identity", "TaskIdentity")
        ident.task_id, ident.run_id, ident.node_id = res.task_id, res.run.run_id, res.context.node_id
        context, run, fab = (serde.context_from_proto(res.context), serde.run_from_proto(res.run),
                             serde.fab_from_proto(res.fab))
        pulled = c.PullMessages(pb.PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("no message for this task on the node's Runtime API")
        node = _get("flwr.proto.node_pb2", "Node")(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = _get("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree")(
            tree, inflatable.make_pull_object_fn_protobuf(c.PullObject, node, context.run_id),
            inflatable.make_confirm_message_received_fn_protobuf(c.ConfirmMessageReceived, node, context.run_id),
            return_type=Message, initial_backoff=backoff, backoff_cap=cap, max_tries_per_object=None)
        _set_message_id(message, tree.object_id)
        return TaskInput(message=message, context=context, fab_id=run.fab_id, fab_version=run.fab_version,
                         fab_hash=fab.hash_str, fab_content=fab.content)

    def push_reply(self, reply: Message, context: Context) -> None:
        _get("flwr.supernode.runtime.run_clientapp", "push_message")(self._client, reply, context)

    def push_status(self, context: Context | None, *, completed: bool, details: str) -> None:
        """The task's final status (and the context the app may have changed)."""
        status = _get("flwr.common.constant", "SubStatus")
        _get("flwr.supernode.runtime.run_clientapp", "push_task_output")(
            client=self._client, context=context, sub_status=status.COMPLETED if completed else status.FAILED,
            details=details)

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Tell the node this task is alive while the body runs."""
        sender = _get("flwr.supercore.heartbeat", "HeartbeatSender")(
            _get("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http")(self._client))
        sender.start()
        try:
            yield
        finally:
            if sender.is_running:
                sender.stop()

    def close(self) -> None:
        self._client.close()


def load_client_app(task: TaskInput) -> ClientApp:
    """Install the (already approved) FAB and load its ClientApp, as ``flwr-clientapp`` does."""
    _get("flwr.cli.install", "install_from_fab")(task.fab_content, skip_prompt=True)
    load = _get("flwr.clientapp.utils", "get_load_client_app_fn")(default_app_ref="", app_path=None, multi_app=True)
    return load(task.fab_id, task.fab_version, task.fab_hash)


def run_gated_clientapp(check: Callable[[bytes], None],
                        wrap: Callable[[Callable[..., Message]], Callable[..., Message]]) -> None:
    """Flower's own ``flwr-clientapp`` (argv as SuperExec gave it), ``check`` before it installs the FAB.

    ``check`` raises to refuse; Flower then replies with an error and installs nothing.
    ``wrap`` wraps the loaded ClientApp (fedmed turns its exceptions into code+ref replies).
    """
    module: Any = importlib.import_module("flwr.supernode.runtime.run_clientapp")  # check_gate() vetted it
    install, get_loader = module.install_from_fab, module.get_load_client_app_fn

    def wrapped_loader(*args: Any, **kwargs: Any) -> Callable[..., Callable[..., Message]]:
        load = get_loader(*args, **kwargs)
        return lambda *a, **kw: wrap(load(*a, **kw))

    module.get_load_client_app_fn = wrapped_loader

    def gated_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(fab_file, bytes):
            raise TypeError("fedmed's app gate expects the FAB's bytes")
        check(fab_file)
        return install(fab_file, *args, **kwargs)

    module.install_from_fab = gated_install
    _get("flwr.supernode.cli", "flwr_clientapp")()
