"""The fixed vocabulary of what travels between the server and a site.

A site's reply holds only ``"arrays"`` (model weights), ``"metrics"`` (numbers) and
``"site"`` (its public name). Everything here is checked on both ends: a site never builds
another key, and the server rejects malformed or non-finite updates, naming the site.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

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
    "encode_job",
    "decode_job",
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


def encode_job(job: dict[str, Any]) -> str:
    """The federation's settings (model/train/data schema) as JSON for a ConfigRecord."""
    return json.dumps(job, sort_keys=True)


def decode_job(config: ConfigRecord) -> dict[str, Any]:
    if JOB_KEY not in config:
        raise ValueError(f"the server's message has no {JOB_KEY!r}: server and site run different fedmed versions")
    return json.loads(str(config[JOB_KEY]))


def make_reply(
    request: Message,
    *,
    site: str,
    metrics: dict[str, float | int | list[float] | list[int]],
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
    """The site name a reply carries (or its node id when it has none)."""
    try:
        return str(msg.content[SITE_KEY]["name"])
    except Exception:  # noqa: BLE001 - error replies carry no content
        return f"node-{msg.metadata.src_node_id}"


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
            rejected.append(Rejected(site, f"site failed: {msg.error.reason}"))
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
        if set(arrays.keys()) != set(ref):
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
            failed[site] = f"site failed: {msg.error.reason}" if msg.has_error() else "reply lacks metrics"
            log.warning("evaluation at site %s failed: %s", site, failed[site])
            continue
        per_site[site] = dict(msg.content["metrics"].items())
    return per_site, failed
