"""``federation.personalize`` at the server: ask every site to fine-tune the final model locally.

One ``evaluate.personalize`` message per site (:data:`fedmed.messages.PERSONALIZE_TYPE`)
with the final model and the fine-tuning settings; each site answers with its test-split
metrics of the global and of its personalised model (:mod:`fedmed.client.personalize`) and
keeps the personalised weights. The server sees numbers only and tabulates global vs
personalised per site, plus the example-weighted mean over sites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedmed.config import FedmedConfig
from fedmed.messages import CONFIG_KEY, JOB_KEY, PERSONALIZE_TYPE, screen_metric_replies
from fedmed.metrics import SCALAR_METRICS
from fedmed.reporting.html import esc, table
from fedmed.transfer import pack

__all__ = ["personalize_sites", "personalization_html", "personalization_summary"]

log = logging.getLogger("fedmed.server")
Send = Callable[[list[Message]], list[Message]]
SHOWN = ("auc", "balanced_accuracy", "accuracy", "f1", "ece")


def personalize_sites(send: Send, nodes: list[int], *, cfg: FedmedConfig, arrays: dict[str, np.ndarray],
                      job: str, federation_id: str) -> dict[str, Any]:
    """Run the fine-tuning step at ``nodes``; per site and pooled ``global`` / ``personalized``
    metrics, failed sites with the reason. Never raises for a site's failure."""
    p = cfg.federation.personalize
    config = ConfigRecord({JOB_KEY: job, "epochs": int(p.epochs), "layers": list(p.layers),
                           "lr": float(p.lr or cfg.train.lr), "federation-id": federation_id})
    msgs = [Message(content=RecordDict({"arrays": pack(arrays), CONFIG_KEY: config}), message_type=PERSONALIZE_TYPE,
                    dst_node_id=n) for n in nodes]
    replies = send(msgs)
    per_site, failed = screen_metric_replies(replies)
    answered = {int(m.metadata.src_node_id) for m in replies}
    failed.update({f"node-{n}": "no reply within the round timeout" for n in nodes if n not in answered})
    sites: dict[str, dict[str, Any]] = {}
    for site, m in sorted(per_site.items()):
        sites[site] = {"num-examples": int(m.get("num-examples", 0)),
                       "trainable-params": int(m.get("trainable-params", 0)),
                       **{kind: {k: float(m[f"{prefix}_{k}"]) for k in SCALAR_METRICS if f"{prefix}_{k}" in m}
                          for kind, prefix in (("global", "global"), ("personalized", "personal"))}}
    pooled: dict[str, dict[str, float]] = {"global": {}, "personalized": {}}
    for kind in pooled:
        for k in SCALAR_METRICS:
            vals = [(s[kind][k], s["num-examples"]) for s in sites.values() if k in s[kind] and s["num-examples"] > 0]
            if vals:
                pooled[kind][k] = float(sum(v * n for v, n in vals) / sum(n for _, n in vals))
    result = {"epochs": p.epochs, "layers": list(p.layers), "lr": float(p.lr or cfg.train.lr), "sites": sites,
              "pooled": pooled, "sites_failed": failed}
    log.info("personalisation: %d site(s) fine-tuned, %d failed; mean test AUC %s -> %s", len(sites), len(failed),
             pooled["global"].get("auc"), pooled["personalized"].get("auc"))
    return result


def personalization_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What summary.json keeps: settings, pooled and per-site AUC / balanced accuracy."""
    return {k: result[k] for k in ("epochs", "layers", "lr", "pooled", "sites_failed")} | {
        "sites": {s: {kind: {k: r[kind].get(k) for k in ("auc", "balanced_accuracy")}
                      for kind in ("global", "personalized")}
                  for s, r in result["sites"].items()}}


def personalization_html(result: dict[str, Any]) -> str:
    """The report's section: one row per site (and the weighted mean), global vs personalised."""
    e = esc

    def f(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    head = ["site", "test n", *(f"{k} {kind}" for k in SHOWN for kind in ("global", "personalised"))]
    rows = [[name, r["num-examples"], *(f(r[kind].get(k)) for k in SHOWN for kind in ("global", "personalized"))]
            for name, r in [*result["sites"].items(),
                            ("mean (by test size)", {**result["pooled"], "num-examples": ""})]]
    failed = "".join(f"<li>{e(s)}: {e(r)}</li>" for s, r in result["sites_failed"].items())
    return (f"<h2>Personalisation</h2><p>Each site fine-tuned the final global model for {result['epochs']} "
            f"epoch(s) on its own training split (layers {e(', '.join(result['layers']))}, lr {result['lr']:g}), "
            "kept it, and reported both models on its own test split (numbers only).</p>"
            + table(head, rows)
            + (f"<p>Failed:</p><ul>{failed}</ul>" if failed else ""))
