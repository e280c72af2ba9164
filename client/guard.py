"""The site's outbound guard: a Flower client mod that checks every reply before it leaves.

Whatever a handler returns, only model arrays, numeric metrics and the site's public name
may go out (:data:`fedmed.messages.REPLY_KEYS`); anything else is blocked and the round
fails at this site instead of leaking. Each reply that leaves is also summarised (keys,
array names and shapes, metric names and values — never data) in the site's audit log, so
a hospital can show what left the building.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedmed.messages import REPLY_KEYS, SECAGG_KEY, SITE_KEY

__all__ = ["privacy_guard", "describe_reply", "wire_bytes", "GuardError", "AUDIT_ENV"]

AUDIT_ENV = "FEDMED_AUDIT_LOG"


class GuardError(RuntimeError):
    """A reply broke the allow-list and was not sent."""


def wire_bytes(msg: Message) -> int:
    """Bytes of the serialised objects Flower pushes for this message (HTTP framing aside)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values()))


def _sized(value: Any) -> Any:
    if isinstance(value, list):
        return [_sized(v) for v in value]
    return f"{len(value)} bytes" if isinstance(value, bytes) else value


def describe_reply(msg: Message) -> dict[str, Any]:
    """What a reply holds, as the audit log records it (no array values), and its size."""
    out: dict[str, Any] = {"type": msg.metadata.message_type, "keys": sorted(msg.content.keys()),
                           "bytes": wire_bytes(msg)}
    for key, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            out[key] = {name: [list(a.shape), a.dtype] for name, a in record.items()}
        elif isinstance(record, MetricRecord):
            out[key] = dict(record)
        elif isinstance(record, ConfigRecord):  # bytes (keys, shares) are logged by size only
            out[key] = {k: _sized(v) for k, v in record.items()}
        else:
            out[key] = type(record).__name__
    return out


def _check(msg: Message) -> None:
    keys = set(msg.content.keys())
    if not keys <= REPLY_KEYS:
        raise GuardError(f"reply blocked: keys {sorted(keys - REPLY_KEYS)} are not allowed to leave the site")
    for key, record in msg.content.items():
        expected = {"arrays": ArrayRecord, "metrics": MetricRecord, SITE_KEY: ConfigRecord,
                    SECAGG_KEY: ConfigRecord}[key]
        if not isinstance(record, expected):
            raise GuardError(f"reply blocked: {key!r} must be a {expected.__name__}")
    if SITE_KEY in msg.content:
        site = msg.content[SITE_KEY]
        if set(site.keys()) != {"name"} or not isinstance(site["name"], str):
            raise GuardError("reply blocked: the site record may only hold the site's name")
    if SECAGG_KEY in msg.content:
        from fedmed.secagg import check_reply_record

        why = check_reply_record(msg.content[SECAGG_KEY])
        if why is not None:
            raise GuardError(f"reply blocked: {why}")
    for name, value in msg.content.get("metrics", MetricRecord()).items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise GuardError(f"reply blocked: metric {name!r} is not numeric")


def privacy_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler, then allow only the fixed reply vocabulary out."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    _check(reply)
    audit = os.environ.get(AUDIT_ENV) or context.node_config.get("audit-log")
    if audit:
        path = Path(str(audit))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"time": time.time(), **describe_reply(reply)}) + "\n")
    return reply
