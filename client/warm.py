"""A warm ClientApp runner: one long-lived process executes every task the SuperNode gets.

Why this exists: Flower 1.41's SuperNode (``--isolation subprocess``) starts a fresh
``flwr-clientapp`` process for every message. At a hospital each such start re-imports
torch/torchvision/sklearn (5–10 s on a small CPU box) and re-reads and re-decodes the
site's data, twice per round (train and evaluate). Flower offers no long-lived ClientApp
runner any more, so fedmed starts the SuperNode with ``--isolation process`` and runs this
loop beside it: it acquires tasks from the node's Runtime API exactly like Flower's
SuperExec does, but runs them in this process, keeping imports, decoded data and the model
(:mod:`fedmed.client.site`'s runtime cache) warm between rounds.

The per-task protocol (pull input → run the ClientApp → push the reply and the task's
status) is Flower's own ``flwr.supernode.runtime.run_clientapp`` without its process exit;
every call goes through Flower's Runtime API client, so the SuperNode keeps its bookkeeping.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

__all__ = ["serve", "run_task"]

log = logging.getLogger("fedmed.client")


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # The Runtime API listens on the node's loopback port only; no TLS on that hop.
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client: RuntimeHttpClient, *, backoff: float = 0.05, cap: float = 0.5):
    """Flower's ``pull_task_input`` with a short retry backoff.

    The node announces a task before it has fetched the message's objects from the
    SuperLink; Flower's default backoff (1 s doubling to 10 s) then idles the site for tens
    of seconds per message on a loopback link. Objects on the node's own port are cheap to
    re-ask for, so poll them quickly instead.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        res.task_id, res.run.run_id, res.context.node_id)
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task on the node's Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=cap, max_tries_per_object=None)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's runner sets it
    return message, context, run, fab


def run_task(address: str, token: str, apps: dict[str, ClientApp]) -> str:
    """Run one acquired task in this process; returns its final status."""
    client = _client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    t0 = time.perf_counter()
    try:
        message, context, run, fab = pull_task_input(client)
        t_in = time.perf_counter() - t0
        app = apps.get(fab.hash_str)
        if app is None:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        t1 = time.perf_counter()
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
        log.info("%s task: input %.2fs, app %.2fs", message.metadata.message_type, t_in,
                 time.perf_counter() - t1)
    except Exception as ex:  # the server gets the reason; this runner serves on
        log.error("ClientApp raised an exception", exc_info=ex)
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            log.info("task done in %.2fs (%s)", time.perf_counter() - t0, status)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status


def serve(address: str, *, poll: float = 0.2, stop: threading.Event | None = None) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at ``address`` until ``stop`` is set."""
    stop = stop or threading.Event()
    client = _client(address, "SuperExec")
    apps: dict[str, ClientApp] = {}
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
    try:
        while not stop.is_set():
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                run_task(address, res.token, apps)
                continue  # a round often sends the next message right away
            stop.wait(poll)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmed.client.warm", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API host:port")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between task polls when idle")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    # Everything the ClientApp needs is imported before the first task, not during a round.
    import fedmed.client.app  # noqa: F401  (pyflakes: imported for its side effect)

    deadline = time.monotonic() + 60
    while True:
        try:
            serve(a.runtime_api_address, poll=a.poll)
            return 0
        except KeyboardInterrupt:
            return 0
        except Exception as ex:  # the node may still be starting: retry for a minute
            if time.monotonic() > deadline:
                print(f"fedmed warm runner: cannot reach the node at {a.runtime_api_address}: {ex}",
                      file=sys.stderr)
                return 1
            time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
