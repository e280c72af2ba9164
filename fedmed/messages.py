"""The fixed vocabulary of what travels between the server and a site.

A site's reply holds only ``"arrays"`` (model weights), ``"metrics"`` (numbers) and
``"site"`` (its public name). Everything here is checked on both ends: a site never builds
another key, and the server rejects malformed or non-finite updates, naming the site.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmed.errors import FedmedError

__all__ = [
    "REPLY_KEYS",
    "CONFIG_KEY",
    "SITE_KEY",
    "SECAGG_KEY",
    "make_reply",
    "reply_site",
    "screen_train_replies",
    "screen_metric_replies",
    "Rejected",
    "CALIBRATION_ACTION",
    "EXTERNAL_EVAL_ACTION",
    "EXTERNAL_EVAL_TYPE",
    "PERSONALIZE_ACTION",
    "PERSONALIZE_TYPE",
    "CROSS_SITE_ACTION",
    "CROSS_SITE_TYPE",
    "STATS_ACTION",
    "encode_job",
    "decode_job",
    "server_config",
    "server_arrays",
    "record_of",
    "number",
    "ERROR_CODES",
    "PublicRefusal",
    "new_ref",
    "error_reason",
    "describe_error",
    "failure_text",
]

log = logging.getLogger(__name__)

CONFIG_KEY = "config"
SITE_KEY = "site"
SECAGG_KEY = "secagg"
REPLY_KEYS = frozenset({"arrays", "metrics", SITE_KEY, SECAGG_KEY})
JOB_KEY = "fedmed-job"
# Temperature scaling after the last round travels as message type "evaluate.calibration";
# its config says the step ("calibration": "fit" | "measure").
CALIBRATION_ACTION = "calibration"
# The fit step's reply metric: the val split's summed NLL at each temperature of the grid. The
# last round's evaluation sends it too, as "val_" + this name, when its config has the grid.
CURVE_KEY = "nll_curve"
# Evaluation of a saved model, no training (fedmed-server --evaluate): message type
# "evaluate.external"; its config carries "split", "temperature", "n-boot" and "seed".
EXTERNAL_EVAL_ACTION = "external"
EXTERNAL_EVAL_TYPE = f"evaluate.{EXTERNAL_EVAL_ACTION}"
# Personalisation after the last round (federation.personalize): message type
# "evaluate.personalize"; the site fine-tunes a copy locally, keeps it, and sends metrics only.
PERSONALIZE_ACTION = "personalize"
PERSONALIZE_TYPE = f"evaluate.{PERSONALIZE_ACTION}"
# Cross-site validation after the last round (federation.cross_site): message type
# "evaluate.crosssite"; its config says the step ("crosssite": "train" | "score").
CROSS_SITE_ACTION = "crosssite"
CROSS_SITE_TYPE = f"evaluate.{CROSS_SITE_ACTION}"
# Federated statistics (fedmed.stats) travel as message type "query.statistics".
STATS_ACTION = "statistics"


# A site's error reply is Error(code, reason) with reason "fedmed/<kind> ref=<12 hex>
# [site=<name>][: <public text>]". The full exception stays in the site's own log under that
# ref; only the kind, the ref, the site's public name and (for refusals built from config
# keys and numbers only) a public text ever leave.
ERROR_CODES: dict[str, int] = {
    "site-data": 1101,    # the site's data failed validation (details only in the site's log)
    "policy": 1102,       # the job or message is outside the site's policy
    "budget": 1103,       # the privacy budget is spent or the DP plan exceeds the site's caps
    "app-refused": 1104,  # the submitted app is not the fedmed ClientApp this site approved
    "guard": 1105,        # the outbound guard blocked a reply
    "internal": 1199,     # anything else
}
_REF = re.compile(r"^[0-9a-f]{12}$")
_SITE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Public text: words, numbers, config keys and a little punctuation; no path separators.
_PUBLIC = re.compile(r"^[A-Za-z0-9 _.,;:=<>≤≥()\[\]'+*%εδσ-]{1,400}$")
_REASON = re.compile(r"^fedmed/(?P<kind>[a-z-]+) ref=(?P<ref>[0-9a-f]{12})"
                     r"(?: site=(?P<site>[A-Za-z0-9_.-]{1,64}))?(?:: (?P<text>.*))?$", re.S)


class PublicRefusal(FedmedError):
    """A refusal whose text is safe to send to the coordinator.

    Raise it only with text built from config keys, numbers and fixed words — never a data
    value, a patient id, a file name or a path. The guard still checks the text's characters.
    """

    kind = "policy"

    def __init__(self, text: str, *, kind: str = "policy") -> None:
        super().__init__(text)
        if kind not in ERROR_CODES:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind = kind


def new_ref() -> str:
    """A fresh site-side reference for one failure (the site's log holds the details)."""
    return secrets.token_hex(6)


def error_reason(kind: str, ref: str, *, site: str | None = None, public: str = "") -> str:
    """The only form a site's error reason takes; unsafe public text is dropped, not sent."""
    if kind not in ERROR_CODES:
        kind = "internal"
    if not _REF.match(ref):
        raise ValueError("ref must be 12 hex digits (new_ref())")
    out = f"fedmed/{kind} ref={ref}"
    if site and _SITE.match(site):
        out += f" site={site}"
    public = " ".join(public.split())
    if public and _PUBLIC.match(public):
        out += f": {public}"
    return out


def describe_error(reason: str | None) -> tuple[str | None, str]:
    """``(site name or None, text to show)`` for an error reply, as the coordinator may keep it.

    Anything that is not a fedmed error reason (an older site, Flower's own exception text)
    is withheld: the coordinator never stores or prints text it cannot vouch for.
    """
    m = _REASON.match(reason or "")
    if m is None:
        return None, "site failed (error text withheld: not a fedmed error reason)"
    text = m["text"] or ""
    if text and not _PUBLIC.match(text):
        text = ""
    shown = f"{m['kind']} (site ref {m['ref']})" + (f": {text}" if text else "")
    return m["site"], shown


def encode_job(job: dict[str, Any]) -> str:
    """The federation's settings (model/train/data schema) as JSON for a ConfigRecord."""
    return json.dumps(job, sort_keys=True)


R = TypeVar("R", ArrayRecord, MetricRecord, ConfigRecord)


def record_of(msg: Message, key: str, kind: type[R]) -> R:
    """``msg.content[key]`` as a ``kind`` record: TypeError when another kind of record is there
    (KeyError when none is)."""
    record = msg.content[key]
    if not isinstance(record, kind):
        raise TypeError(f"{key!r} holds a {type(record).__name__}, not a {kind.__name__}")
    return record


def number(value: object) -> float:
    """A MetricRecord value that must be one number, as a float (TypeError for a list)."""
    if not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def server_config(msg: Message) -> Mapping[str, Any]:
    """The server's settings in a message: the ConfigRecord under ``CONFIG_KEY``.

    Typed ``Mapping[str, Any]`` on purpose: every value is the coordinator's and unchecked, so
    each reader converts (``int()``, ``list()``...) and bounds what it takes. Another kind of
    record under that key is refused (PublicRefusal).
    """
    record = msg.content[CONFIG_KEY]
    if not isinstance(record, ConfigRecord):
        raise PublicRefusal(f"the server's {CONFIG_KEY} is not a ConfigRecord")
    return record


def server_arrays(msg: Message) -> ArrayRecord:
    """The weights in a server's message (the ArrayRecord under ``"arrays"``); another kind of
    record there is refused (PublicRefusal)."""
    record = msg.content["arrays"]
    if not isinstance(record, ArrayRecord):
        raise PublicRefusal("the server's arrays are not an ArrayRecord")
    return record


def decode_job(config: Mapping[str, Any]) -> dict[str, Any]:
    """The job a message carries; refused (PublicRefusal) when it is absent or malformed."""
    if JOB_KEY not in config:
        raise PublicRefusal(f"the server's message has no {JOB_KEY}: server and site run different fedmed versions",
                            kind="app-refused")
    try:
        job = json.loads(str(config[JOB_KEY]))
    except ValueError:
        job = None
    if not isinstance(job, dict):
        raise PublicRefusal(f"the server's {JOB_KEY} is not a JSON object")
    return job


def make_reply(
    request: Message,
    *,
    site: str,
    metrics: Mapping[str, float | int | list[float] | list[int]],
    arrays: ArrayRecord | None = None,
) -> Message:
    """Build a site's reply from numbers and weights only (the privacy allow-list)."""
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        if isinstance(value, (list, tuple)):
            value = [float(v) for v in value]
        if not isinstance(value, (int, float, list)):
            raise TypeError(f"metric {key!r} is not numeric; only numbers leave a site")
        if isinstance(value, float) and not math.isfinite(value):
            continue  # MetricRecord cannot say NaN reliably; absent means undefined
        clean[key] = value
    content = RecordDict({"metrics": MetricRecord(clean), SITE_KEY: ConfigRecord({"name": site})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=request)


def reply_site(msg: Message) -> str:
    """The site name a reply carries (an error reply: from its reason; else its node id)."""
    if msg.has_error():
        site, _ = describe_error(msg.error.reason)
        return site or f"node-{msg.metadata.src_node_id}"
    try:
        return str(msg.content[SITE_KEY]["name"])
    except Exception:  # noqa: BLE001 - a malformed reply
        return f"node-{msg.metadata.src_node_id}"


def failure_text(msg: Message) -> str:
    """Why an error reply failed, in the form the coordinator may keep (see describe_error)."""
    return describe_error(msg.error.reason)[1]


@dataclass
class Rejected:
    site: str
    reason: str


def screen_train_replies(
    replies: Iterable[Message], reference: ArrayRecord
) -> tuple[list[Message], list[Rejected]]:
    """Keep replies whose arrays match the global model's names/shapes and are finite.

    Error replies (a site crashed or timed out) and malformed updates are returned as
    :class:`Rejected` with a reason; the federation goes on with the rest.
    """
    ref = {k: (tuple(a.shape), a.dtype) for k, a in reference.items()}
    ok: list[Message] = []
    rejected: list[Rejected] = []
    for msg in replies:
        site = reply_site(msg)
        if msg.has_error():
            rejected.append(Rejected(site, failure_text(msg)))
            continue
        extra = set(msg.content.keys()) - REPLY_KEYS
        if extra:
            rejected.append(Rejected(site, f"unexpected reply keys {sorted(extra)}"))
            continue
        if "arrays" not in msg.content or "metrics" not in msg.content:
            rejected.append(Rejected(site, "reply lacks arrays or metrics"))
            continue
        arrays = msg.content["arrays"]
        reason = None
        if not isinstance(arrays, ArrayRecord) or not isinstance(msg.content["metrics"], MetricRecord):
            reason = "reply's arrays or metrics are the wrong kind of record"
        elif set(arrays.keys()) != set(ref):
            reason = "update has different parameter names than the global model"
        else:
            for key, arr in arrays.items():
                if tuple(arr.shape) != ref[key][0]:
                    reason = f"parameter {key} has shape {tuple(arr.shape)}, expected {ref[key][0]}"
                    break
                values = arr.numpy()  # masked (secure aggregation) updates are uint64: no NaN check
                if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                    reason = f"parameter {key} contains NaN or Inf"
                    break
        n = msg.content["metrics"].get("num-examples", 0)
        if reason is None and (not isinstance(n, (int, float)) or n <= 0):
            reason = "num-examples missing or not positive"
        if reason:
            rejected.append(Rejected(site, reason))
        else:
            ok.append(msg)
    for r in rejected:
        log.warning("round update from site %s rejected: %s", r.site, r.reason)
    return ok, rejected


def screen_metric_replies(replies: Iterable[Message]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Metrics per site from evaluation-like replies, and the sites that failed with why.

    A reply that is an error or lacks metrics is a failure (logged with the site's name),
    never an exception: the federation goes on with the rest.
    """
    per_site: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for msg in replies:
        site = reply_site(msg)
        if msg.has_error() or "metrics" not in msg.content:
            failed[site] = failure_text(msg) if msg.has_error() else "reply lacks metrics"
            log.warning("evaluation at site %s failed: %s", site, failed[site])
            continue
        per_site[site] = dict(msg.content["metrics"].items())
    return per_site, failed
