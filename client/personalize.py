"""A site's side of ``federation.personalize``: fine-tune the final global model locally.

After the last round the server sends the final (best, calibrated) model once more, type
``evaluate.personalize``. The site fine-tunes a copy on its own training split — only the
layers named by ``layers`` (parameter-name prefixes, or ``all``), for ``epochs`` epochs —
scores both the global and the personalised model on its own test split and sends those
numbers only. The personalised model never leaves: it is saved under the site's state
folder (``personalized/<federation id>.pt``, a fedmed checkpoint) for the site's own use.

This step is independent of how the federation trained (FedAvg, FedProx, FedBN keeping
normalisation layers local): it starts from whatever weights the server sends.
"""

from __future__ import annotations

import copy
import re
import zlib
from pathlib import Path
from typing import Any

import torch

from fedmed.checkpoint import save_checkpoint
from fedmed.client.policy import check_name
from fedmed.client.site import SiteRuntime
from fedmed.messages import PublicRefusal
from fedmed.metrics import SCALAR_METRICS
from fedmed.train.loop import evaluate, make_optimizer, train_epochs

__all__ = ["personalize_at_site", "select_layers", "MAX_EPOCHS"]

MAX_EPOCHS = 100  # a hostile coordinator must not keep the site busy for days


def select_layers(model: torch.nn.Module, layers: list[str]) -> int:
    """Freeze every parameter but those whose name starts with one of ``layers`` (or all with
    ``["all"]``); returns how many values will train. Raises ``ValueError`` when none match."""
    every = "all" in layers
    n = 0
    for name, p in model.named_parameters():
        keep = every or any(name == pre or name.startswith(pre.rstrip(".") + ".") for pre in layers)
        p.requires_grad_(keep)
        n += p.numel() if keep else 0
    if n == 0:
        raise PublicRefusal("federation.personalize.layers match no parameter of the model")
    return n


def _metrics(rt: SiteRuntime, model: torch.nn.Module) -> dict[str, Any]:
    return evaluate(model, rt.loaders["test"], device=rt.device, n_classes=rt.n_classes, amp=rt.cfg.train.amp,
                    loss_fn=rt.loss_fn, multilabel=rt.cfg.model.multilabel)


def personalize_at_site(rt: SiteRuntime, config: dict[str, Any]) -> dict[str, float | int]:
    """Fine-tune ``rt.model`` (already holding the global weights); numbers for the reply.

    Keys: ``num-examples`` (test samples), ``trainable-params``, ``global_<metric>`` and
    ``personal_<metric>`` for every scalar metric. Raises ``ValueError`` for a bad request
    or a DP federation (fine-tuning here would train outside the site's privacy budget).
    """
    epochs = int(config.get("epochs", 0))
    layers = [str(x) for x in (config.get("layers") or ["all"])]
    if not 1 <= epochs <= MAX_EPOCHS:
        raise PublicRefusal(f"personalisation needs 1 <= epochs <= {MAX_EPOCHS}")
    if rt.cfg.privacy.enabled:
        raise PublicRefusal("personalisation trains without DP-SGD; it is off for federations with privacy.enabled")
    lr = float(config.get("lr") or rt.cfg.train.lr)
    if not 0 < lr <= 1:
        raise PublicRefusal("personalisation lr must be in (0, 1]")
    before = _metrics(rt, rt.model)
    work = copy.deepcopy(rt.model)
    trainable = select_layers(work, layers)
    rt.reseed(rt.cfg.train.seed + 7919 + zlib.crc32(rt.site.encode()) % 997)
    train_epochs(work, rt.loaders["train"], loss_fn=rt.loss_fn, optimizer=make_optimizer(work, rt.cfg.train, lr=lr),
                 device=rt.device, epochs=epochs, amp=rt.cfg.train.amp, grad_clip=rt.cfg.train.grad_clip,
                 max_steps_per_epoch=rt.cfg.train.max_steps_per_epoch, desc=f"{rt.site} personalize")
    after = _metrics(rt, work)
    _save(rt, work, check_name("federation-id", config.get("federation-id", "run")))
    out: dict[str, float | int] = {"num-examples": int(before.get("n", 0)), "trainable-params": int(trainable)}
    for key in SCALAR_METRICS:
        for prefix, m in (("global", before), ("personal", after)):
            if isinstance(m.get(key), float):
                out[f"{prefix}_{key}"] = m[key]
    return out


def _save(rt: SiteRuntime, model: torch.nn.Module, federation: str) -> Path:
    state = rt.site_cfg.state_path()
    path = state / "personalized" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', federation)[:64]}.pt"
    return save_checkpoint(path, weights=model.state_dict(), config=rt.cfg, meta={"personalized": True})
