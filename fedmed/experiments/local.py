"""Local (non-federated) training on one site or a pooled set: the baseline every
federation is compared with, and the quickest way to check a site's data and model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fedmed.config import FedmedConfig
from fedmed.device import select_device
from fedmed.metrics import format_metrics
from fedmed.task import (
    load_site_bundle,
    make_loaders,
    model_from_config,
    seed_everything,
    training_loss,
)
from fedmed.train.loop import evaluate, fit

__all__ = ["train_local"]


def train_local(
    cfg: FedmedConfig,
    *,
    sites: list[str] | None = None,
    out_dir: str | Path | None = None,
    bundle=None,
) -> dict[str, Any]:
    """Train ``cfg.model`` on the named sites (pooled when several) and evaluate it.

    Returns ``{"metrics": {"val": ..., "test": ...}, "history": [...], "table": str,
    "out_dir": Path}`` and writes ``metrics.json`` (no patient data) and ``model.pt``.
    """
    seed_everything(cfg.train.seed)
    bundle = bundle or load_site_bundle(cfg, sites=sites, progress=cfg.train.progress)
    label = bundle.name
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name / f"local-{label}-{cfg.model.variant}"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.progress:
        print(bundle.splits.summary.table())
    device = select_device(cfg.train.device)
    model = model_from_config(cfg).to(device)
    loaders = make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                           num_workers=cfg.data.num_workers)
    loss_fn = training_loss(cfg, bundle).to(device)
    start = time.perf_counter()
    res = fit(model, loaders["train"], loaders["val"], cfg=cfg.train, loss_fn=loss_fn,
              device=device, n_classes=bundle.n_classes, multilabel=cfg.model.multilabel)
    metrics = {
        split: evaluate(model, loaders[split], device=device, n_classes=bundle.n_classes,
                        amp=cfg.train.amp, loss_fn=loss_fn, multilabel=cfg.model.multilabel)
        for split in ("val", "test")
    }
    summary = {
        "site": label,
        "pool": bundle.pool,  # how a pooled model's splits were made (fedmed.heldout reads it)
        "variant": cfg.model.variant,
        "backbone": cfg.model.backbone,
        "device": str(device),
        "epochs_run": len(res.history),
        "best_epoch": res.best_epoch,
        "stopped_early": res.stopped_early,
        "seconds": round(time.perf_counter() - start, 2),
        "classes": list(cfg.data.classes),
        "split_sizes": {k: int(len(v)) for k, v in bundle.splits.indices.items()},
        "metrics": metrics,
        "history": res.history,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"),
                "encoder": bundle.splits.encoder.state_dict()}, out / "model.pt")
    table = format_metrics({f"{label} {cfg.model.variant} {k}": v for k, v in metrics.items()})
    return {"metrics": metrics, "history": res.history, "table": table, "out_dir": out}
