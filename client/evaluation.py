"""A site's side of ``fedmed-server --evaluate``: score a saved model, send numbers only.

The server sends the weights, the job and ``split`` / ``temperature`` / ``n-boot`` /
``seed``; the site scores its own data exactly as ``fedmed evaluate`` would
(:func:`fedmed.evaluate.load_eval_set`) — no optimiser, no training step — and returns
per metric its value, bootstrap standard error and 95 % interval (patients resampled), so
the server can pool sites with intervals without seeing a single row. If the site's data
does not fit the model, the details stay in the site's log; the server only hears that.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from fedmed.bootstrap import bootstrap_metrics
from fedmed.checkpoint import Checkpoint
from fedmed.config import FedmedConfig, SiteConfig
from fedmed.messages import PublicRefusal

__all__ = ["evaluate_saved_model", "MAX_BOOT"]

log = logging.getLogger("fedmed.client")
MAX_BOOT = 2000  # a hostile coordinator must not make the site compute for hours


def evaluate_saved_model(cfg: FedmedConfig, site_cfg: SiteConfig, weights: dict[str, Any],
                         config: dict[str, Any]) -> dict[str, float | int | list[float]]:
    """Metrics of the model ``weights`` on this site's data; flat numbers for the reply.

    Keys: ``num-examples``, ``num-patients`` and for each metric ``m``: ``m``, ``m_se``,
    ``m_lo``, ``m_hi`` (undefined ones are left out), plus the flattened confusion matrix.
    Raises ``ValueError`` on a bad request or data that does not fit (details logged here).
    """
    from fedmed.evaluate import SPLITS, load_eval_set
    from fedmed.fit_check import DataMismatch
    from fedmed.metrics import compute_metrics
    from fedmed.predict import logits_of, probabilities

    split = str(config.get("split", "test"))
    if split not in SPLITS:
        raise PublicRefusal(f"evaluation split must be one of {list(SPLITS)}")
    temperature = float(config.get("temperature", 1.0))
    n_boot = int(config.get("n-boot", 200))
    if not (math.isfinite(temperature) and 0.01 <= temperature <= 100) or not 0 <= n_boot <= MAX_BOOT:
        raise PublicRefusal(f"evaluation needs 0.01 <= temperature <= 100 and 0 <= n-boot <= {MAX_BOOT}")
    if cfg.model.multilabel:
        raise PublicRefusal("federated evaluation is for single-label (softmax) models")
    encoder = json.loads(str(config["record-encoder"])) if config.get("record-encoder") else None
    if encoder is not None and not isinstance(encoder, dict):
        raise PublicRefusal("record-encoder must be a JSON object")
    ckpt = Checkpoint(path=Path("server-model"), weights={k: torch.as_tensor(v) for k, v in weights.items()},
                      config=cfg, encoder=encoder, temperature=temperature)
    try:
        data = load_eval_set(ckpt, site_cfg.data_dir, split=split, cache_dir=site_cfg.cache_dir)
    except DataMismatch as exc:
        log.error("the server's model does not fit this site's data: %s", exc)
        raise PublicRefusal("this site's data does not fit the model (classes, channels or features); "
                            "the site's log says what differs", kind="site-data") from None
    if len(data.labels) == 0:
        return {"num-examples": 0}
    probs = probabilities(logits_of(ckpt.build_model(), data.dataset), temperature=temperature)
    out: dict[str, float | int | list[float]] = {"num-examples": int(len(data.labels)),
                                                 "num-patients": int(len(set(data.patients)))}
    if n_boot:
        stats = bootstrap_metrics(data.labels, probs, groups=data.patients, n_boot=n_boot,
                                  seed=int(config.get("seed", 0)), n_classes=len(cfg.data.classes))
        for key, m in stats.items():
            out[key] = m["value"]
            out.update({f"{key}_{part}": m[part] for part in ("se", "lo", "hi")})
    else:
        point = compute_metrics(data.labels, probs, n_classes=len(cfg.data.classes))
        out.update({k: v for k, v in point.items() if isinstance(v, float)})
    cm = compute_metrics(data.labels, probs, n_classes=len(cfg.data.classes))["confusion_matrix"]
    out["confusion_matrix"] = [float(x) for row in cm for x in row]
    return out
