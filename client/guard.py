"""The site's guard: a Flower client mod every message and every reply passes, error or not.

Inbound, it refuses message types the site's policy does not allow before any handler runs.
Outbound, only model arrays, numeric metrics and the site's public name may go out
(:data:`fedmed.messages.REPLY_KEYS`); anything else is blocked. Nothing that fails at the
site leaves as text: an exception becomes an error reply with a fixed code and a site-side
reference (:func:`fedmed.messages.error_reason`), and the full exception goes to the site's
own log under that reference. Only a :class:`~fedmed.messages.PublicRefusal` — text built
from config keys and numbers — adds its reason. Every reply, refusals included, is summarised
(keys, array names and shapes, metric names and values — never data) in the site's audit log,
so a hospital can show what left the building.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.app.error import Error
from flwr.clientapp.typing import ClientAppCallable

from fedmed.config import ConfigError
from fedmed.errors import FedmedError
from fedmed.messages import ERROR_CODES, REPLY_KEYS, SECAGG_KEY, SITE_KEY, PublicRefusal, error_reason, new_ref

__all__ = ["privacy_guard", "describe_reply", "wire_bytes", "GuardError", "AUDIT_ENV", "error_reply",
           "classify"]

AUDIT_ENV = "FEDMED_AUDIT_LOG"
log = logging.getLogger("fedmed.client")


class GuardError(FedmedError, RuntimeError):
    """A reply broke the allow-list and was not sent."""


def classify(exc: BaseException) -> tuple[str, str]:
    """``(kind, public text)`` for an exception at the site: only refusals keep their words."""
    from fedmed.data.dicom import DicomError
    from fedmed.data.images import ImageError
    from fedmed.data.records import RecordError
    from fedmed.data.site import SiteDataError

    if isinstance(exc, PublicRefusal):
        return exc.kind, str(exc)
    if isinstance(exc, (SiteDataError, RecordError, ImageError, DicomError)):
        return "site-data", "the site's data failed validation; the site's log has the details"
    if isinstance(exc, ConfigError):
        return "policy", "the site's own configuration is invalid; the site's log has the details"
    if isinstance(exc, GuardError):
        return "guard", "a reply was blocked by the site's outbound guard"
    return "internal", ""


def error_reply(request: Message, exc: BaseException, *, site: str | None) -> Message:
    """The error reply for ``exc``: a fixed code and reference, the details only in the site's log."""
    kind, public = classify(exc)
    ref = new_ref()
    if kind in ("policy", "budget", "app-refused"):
        log.warning("refused %s (ref %s): %s", request.metadata.message_type, ref, exc)
    else:
        log.error("%s failed (ref %s, %s)", request.metadata.message_type, ref, kind, exc_info=exc)
    reason = error_reason(kind, ref, site=site, public=public)
    return Message(Error(code=ERROR_CODES[kind], reason=reason), reply_to=request)


def wire_bytes(msg: Message) -> int:
    """Bytes of the serialised objects Flower pushes for this message (HTTP framing aside)."""
    from fedmed.client.flower_compat import wire_bytes as _wire_bytes  # Flower internals live there

    return _wire_bytes(msg)


def _sized(value: Any) -> Any:
    if isinstance(value, list):
        return [_sized(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()[:12]}
    return value


def describe_reply(msg: Message) -> dict[str, Any]:
    """What a reply holds, as the audit log records it (no array values), and its size."""
    out: dict[str, Any] = {"type": msg.metadata.message_type, "keys": sorted(msg.content.keys()),
                           "bytes": wire_bytes(msg)}
    for key, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            out[key] = {name: [list(a.shape), a.dtype] for name, a in record.items()}
        elif isinstance(record, MetricRecord):
            out[key] = dict(record)
        elif isinstance(record, ConfigRecord):  # bytes (keys, shares): size and fingerprint only
            out[key] = {k: _sized(v) for k, v in record.items()}
        else:
            out[key] = type(record).__name__
    return out


def _check(msg: Message, *, max_list: int) -> None:
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
        if len(values) > max_list:
            raise GuardError(f"reply blocked: metric {name!r} has {len(values)} values, above the "
                             f"site's policy.max_metric_list {max_list}")


def _site_config(context: Context) -> Any:
    from fedmed.client.site import resolve_site  # the site module imports the heavy task layer

    return resolve_site(context)


def _audit(context: Context, entry: dict[str, Any]) -> None:
    audit = os.environ.get(AUDIT_ENV) or context.node_config.get("audit-log")
    if audit:
        path = Path(str(audit))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"time": time.time(), **entry}) + "\n")


def privacy_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: the site's policy on the way in, the reply vocabulary on the way out.

    Never raises: whatever fails becomes an error reply with a fixed code and reference.
    """
    from fedmed.client.policy import check_message

    site_name = str(context.node_config.get("site", "")) or None
    try:
        site = _site_config(context)
        site_name = site.site
        check_message(msg.metadata.message_type, site)
        reply = call_next(msg, context)
        if reply.has_error():  # an error a handler built itself: its text is not vouched for
            raise GuardError(f"handler returned an error reply (code {reply.error.code}: "
                             f"{reply.error.reason})")  # the site's log only
        _check(reply, max_list=site.policy.max_metric_list)
        _audit(context, describe_reply(reply))  # fail closed: what cannot be logged is not sent
        return reply
    except Exception as exc:  # noqa: BLE001 - nothing leaves as exception text
        reply = error_reply(msg, exc, site=site_name)
    try:
        _audit(context, {"type": msg.metadata.message_type, "keys": [], "bytes": wire_bytes(reply),
                         "error": reply.error.reason})
    except Exception:  # noqa: BLE001 - an error reply carries nothing; still tell the server
        log.exception("could not write the audit log for an error reply")
    return reply
