"""fedmedpeer: plain PyTorch for the peers (model, data, train, test), shared by the Flower
app and the NVIDIA FLARE client.

The model, the site data (splits, loaders, decoded-image cache) and the class-weighted loss
are fedmed's, built from fedmed's benchmark config, so a peer computes what fedmed computes;
the test loop is the examples' plain loop, the training loop fedmed's (see :func:`train`).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["Net", "load_central", "load_config", "load_data", "round_lr", "seed_round", "test", "train"]


def load_config(fedmed_config: str, cohort: str, *, rounds: int, local_epochs: int, image_size: int):
    """fedmed's benchmark config (benchmarks/common.py ``bench_config``) for this cohort and job."""
    from fedmed.config import load_config as fedmed_load

    root = Path(cohort)
    sites = sorted(p.name for p in root.iterdir() if (p / "records.csv").exists() and p.name != "central")
    return fedmed_load(fedmed_config, [
        f"data.root={root}", f"data.sites=[{','.join(sites)}]", "data.notes_column=null",
        "federation.central_test=null", f"federation.min_sites={len(sites)}", "train.progress=false",
        f"federation.rounds={rounds}", f"federation.local_epochs={local_epochs}", f"data.image_size={image_size}",
    ])


def Net(cfg) -> nn.Module:
    """fedmed's model for this config, initialised from the run seed as fedmed's server does."""
    from fedmed.task import model_from_config, seed_everything

    seed_everything(cfg.train.seed)
    return model_from_config(cfg)


def load_data(cfg, site: str) -> tuple[DataLoader, DataLoader, nn.Module]:
    """A site's train and test loaders and its (class-weighted) training loss, as fedmed builds them."""
    from fedmed.task import load_site_bundle, make_loaders, training_loss

    bundle = load_site_bundle(cfg, sites=[site], progress=False)
    loaders = make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    return loaders["train"], loaders["test"], training_loss(cfg, bundle)


def load_central(cfg) -> DataLoader:
    """The coordinator's held-out test split (the cohort's ``central`` folder)."""
    from fedmed.task import load_site_bundle, make_loaders

    bundle = load_site_bundle(cfg, site_dir=Path(cfg.data.root) / "central", progress=False)
    return make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed)["test"]


def round_lr(cfg, server_round: int) -> float:
    """The base rate on a cosine over rounds (fedmed's default schedule for a federation)."""
    return cfg.train.lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / max(cfg.federation.rounds, 1)))


def seed_round(cfg, server_round: int, site: str, loader: DataLoader) -> None:
    """One seed per (run seed, round, site), the scheme fedmed's sites use, so reruns repeat."""
    from fedmed.task import seed_everything

    seed = cfg.train.seed + 1000 * server_round + zlib.crc32(site.encode()) % 997
    seed_everything(seed)
    loader.generator.manual_seed(seed)


def _inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "label"}, batch["label"].to(device)


def train(net: nn.Module, loader: DataLoader, *, epochs: int, lr: float, criterion: nn.Module, cfg,
          device: torch.device) -> float:
    """Train ``epochs`` passes with fedmed's optimizer and loop; returns the mean training loss.

    fedmed's own loop, not the examples' five lines: they compute the same steps (the trainer
    benchmark puts the two within noise), but fedmed's progress wrapper (tqdm.auto) opens one
    extra iterator over the loader, which advances its seeded generator, so only the same loop
    visits the batches in the same order and the final AUCs can be compared at all.
    """
    from fedmed.train.loop import make_optimizer, train_epochs

    net.to(device)
    optimizer = make_optimizer(net, cfg.train, lr=lr)
    return train_epochs(net, loader, loss_fn=criterion, optimizer=optimizer, device=device, epochs=epochs,
                        amp=cfg.train.amp)["loss"]


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Loss, accuracy and ROC AUC (positive class) of ``net`` on ``loader``."""
    net.to(device).eval()
    ys, ps, loss = [], [], 0.0
    for batch in loader:
        inputs, labels = _inputs(batch, device)
        logits = net(**inputs).float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        ys.append(labels.cpu().numpy())
        ps.append(torch.softmax(logits, dim=-1).cpu().numpy())
    y, p = np.concatenate(ys), np.concatenate(ps)
    return {"loss": loss / len(y), "accuracy": float((p.argmax(1) == y).mean()),
            "auc": float(roc_auc_score(y, p[:, 1])), "num-examples": len(y)}
