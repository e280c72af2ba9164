"""Temperature scaling at the end of a federation: the final model's ``T`` and what it changes.

Two messages go to every connected site (type ``evaluate.calibration``, handled in
:mod:`fedmed.client.app`), each with the model's weights:

1. ``fit``: each site returns the summed NLL of its val split at every temperature of a
   shared grid; the server adds the curves and takes the minimum (``federated``). With
   ``central`` the server fits ``T`` on its own central val split instead. When the model is
   the last round's, the curves came with that round's evaluation, and this step is skipped.
2. ``measure``, carrying ``T``: each site returns its test split's ECE and NLL at ``T = 1``
   and at ``T`` and per-bin sums (count, confidence, correct), which add up to the pooled
   test sets' ECE and reliability diagram. A central set's test split is measured too.

Only numbers cross the wire. A site that fails, times out or sends a malformed reply is
listed with the reason, never fatal; with no usable curve at all the result says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmed.calibration import (
    BIN_KEYS,
    MEASURE_KEYS,
    N_BINS,
    combine_measures,
    fit_temperature,
    fit_temperature_from_curves,
    measure,
    temperature_grid,
)
from fedmed.errors import UsageError
from fedmed.messages import CALIBRATION_ACTION, CONFIG_KEY, CURVE_KEY, JOB_KEY, screen_metric_replies
from fedmed.transfer import pack

__all__ = ["calibrate_federation", "calibration_summary", "MESSAGE_TYPE"]

log = logging.getLogger("fedmed.server")

MESSAGE_TYPE = f"{MessageType.EVALUATE}.{CALIBRATION_ACTION}"
MEASURED = (*MEASURE_KEYS, "accuracy")

Send = Callable[[list[Message]], list[Message]]
CentralLogits = Callable[[dict[str, np.ndarray], str], tuple[np.ndarray, np.ndarray]]


def _finite(values: Any) -> bool:
    vals = values if isinstance(values, list) else [values]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              for v in vals)


def _curve_problem(m: dict[str, Any], points: int) -> str | None:
    if not _finite(m.get("num-examples")) or m["num-examples"] <= 0:
        return "no validation examples"
    curve = m.get(CURVE_KEY)
    if not isinstance(curve, list) or len(curve) != points:
        return f"NLL curve has {len(curve) if isinstance(curve, list) else 0} points, the grid {points}"
    return None if _finite(curve) else "NLL curve is not finite"


def _measure_problem(m: dict[str, Any]) -> str | None:
    if not _finite(m.get("num-examples")) or m["num-examples"] <= 0:
        return "no test examples"
    missing = [k for k in MEASURED if not _finite(m.get(k))]
    bins = [f"bins_{w}_{k}" for w in ("before", "after") for k in BIN_KEYS]
    missing += [k for k in bins if not (isinstance(m.get(k), list) and len(m[k]) == N_BINS and _finite(m[k]))]
    return f"missing or malformed {', '.join(missing)}" if missing else None


def _ask(send: Send, nodes: list[int], arrays: ArrayRecord, config: dict[str, Any]
         ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """One calibration step at every node: metrics per site and failures (no reply included)."""
    if not nodes:
        return {}, {}
    msgs = [Message(content=RecordDict({"arrays": arrays, CONFIG_KEY: ConfigRecord(config)}),
                    message_type=MESSAGE_TYPE, dst_node_id=n) for n in nodes]
    replies = send(msgs)
    per_site, failed = screen_metric_replies(replies)
    answered = {int(m.metadata.src_node_id) for m in replies}
    failed.update({f"node-{n}": "no reply within the round timeout" for n in nodes if n not in answered})
    return per_site, failed


def calibrate_federation(
    send: Send,
    nodes: list[int],
    *,
    method: str,
    arrays: dict[str, np.ndarray],
    job: str,
    central_logits: CentralLogits | None = None,
    val_curves: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fit ``T`` (``method`` "federated" or "central") for the model ``arrays`` and measure it.

    ``send(messages) -> replies`` is the round driver's exchange with the Grid; ``job`` the
    encoded job the sites build the model from; ``central_logits(arrays, split)`` the
    server's own held-out set (required for "central"). ``val_curves``: per site, the
    ``nll_curve`` and ``num-examples`` the last round's evaluation already returned for these very
    weights (``fedmed.messages.CURVE_KEY``); they replace the fit step when every node sent one.
    Returns a JSON-able dict:
    ``method``, ``temperature``, ``fit`` (where and on how many examples), ``sites`` and
    ``sites_failed`` of the measuring step, ``pooled`` (:func:`combine_measures` of the
    sites), ``central_test`` (when there is a central set) and ``seconds``; ``error``
    instead of ``temperature`` when no fit was possible. Raises ``ValueError`` for an
    unknown method or "central" without ``central_logits``.
    """
    if method not in ("federated", "central"):
        raise ValueError(f"calibration method must be 'federated' or 'central', not {method!r}")
    if method == "central" and central_logits is None:
        raise UsageError("calibration: central needs the server's central set (federation.central_test)")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"method": method}
    current = pack(arrays)
    base = {JOB_KEY: job, CALIBRATION_ACTION: "fit"}
    if method == "central":
        assert central_logits is not None  # checked above
        z, y = central_logits(arrays, "val")
        result["fit"] = {"on": "central val split", "num-examples": int(len(y))}
        temperature = fit_temperature(z, y) if len(y) else None
    else:
        grid = temperature_grid()
        failed: dict[str, str] = {}
        asked = None
        if val_curves is not None and len(val_curves) >= len(nodes):  # one exchange fewer
            per_site, asked = dict(val_curves), "with the last round's evaluation"
        else:
            per_site, failed = _ask(send, nodes, current, {**base, "temperatures": grid.tolist()})
        curves: dict[str, dict[str, Any]] = {}
        for site, m in per_site.items():
            problem = _curve_problem(m, len(grid))
            if problem:
                failed[site] = problem
            else:
                curves[site] = m
        result["fit"] = {"on": "sites' val splits", "sites": sorted(curves),
                         "num-examples": int(sum(m["num-examples"] for m in curves.values())),
                         "sites_failed": failed}
        if asked is not None:
            result["fit"]["asked"] = asked
        temperature = (fit_temperature_from_curves([m[CURVE_KEY] for m in curves.values()], grid)
                       if curves else None)
    if temperature is None:
        result["error"] = f"no validation examples to fit a temperature on ({result['fit']['on']})"
        result["seconds"] = time.perf_counter() - t0
        log.warning("calibration: %s", result["error"])
        return result
    result["temperature"] = float(temperature)
    # the central test logits are computed while the sites measure (the same numbers, sooner)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmed-central") as pool:
        central_test = pool.submit(central_logits, arrays, "test") if central_logits is not None else None
        per_site, failed = _ask(send, nodes, current, {**base, CALIBRATION_ACTION: "measure",
                                                       "temperature": float(temperature)})
    sites: dict[str, dict[str, Any]] = {}
    for site, m in per_site.items():
        problem = _measure_problem(m)
        if problem:
            failed[site] = problem
        else:
            sites[site] = m
    result["sites"], result["sites_failed"] = sites, failed
    if sites:
        result["pooled"] = combine_measures(sites)
    if central_test is not None:
        z, y = central_test.result()
        if len(y):
            result["central_test"] = measure(z, y, temperature=float(temperature))
    result["seconds"] = time.perf_counter() - t0
    return result


def calibration_summary(cal: dict[str, Any] | None) -> dict[str, Any] | None:
    """The result without the reliability-bin lists (for summary.json and logs)."""
    if cal is None:
        return None

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if not str(k).startswith("bins_")}
        return d

    return strip(cal)
