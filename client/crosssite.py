"""A site's side of cross-site validation (``federation.cross_site``).

Two steps, both of type ``evaluate.crosssite``:

1. ``train``: the server sends the federation's initial weights and the budget (the
   federation's rounds × local epochs); the site trains its own local model from them on its
   training split, saves it under its state folder (``crosssite/<federation id>.pt``) and
   replies with its weights only as its policy allows (``policy.local_model`` in the site's YAML:
   ``private`` never sends them, ``relay``/``share`` do — the reply says which, so the server
   knows whether it may keep them).
2. ``score``: the site scores the model it is sent (``model`` names it; ``own`` means its
   saved local model) on its own test split and replies with metrics only.
"""

from __future__ import annotations

import copy
import re
import zlib
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedmed.checkpoint import load_checkpoint, save_checkpoint
from fedmed.client.policy import check_name, check_number
from fedmed.client.site import SiteRuntime
from fedmed.data.dataset import dataset_size
from fedmed.messages import PublicRefusal
from fedmed.train.loop import evaluate, make_optimizer, train_epochs
from fedmed.transfer import pack

__all__ = ["train_local_model", "score_model", "MAX_EPOCHS", "POLICY_CODES"]

MAX_EPOCHS = 1000
POLICY_CODES = {"private": 0, "relay": 1, "share": 2}  # what the reply's "local-model-policy" means


def _path(rt: SiteRuntime, federation: str) -> Path:
    state = rt.site_cfg.state_path()
    return state / "crosssite" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', federation)[:64]}.pt"


def train_local_model(rt: SiteRuntime, config: dict[str, Any]) -> tuple[dict[str, int | float], ArrayRecord | None]:
    """Step 1: train from the weights in ``rt.model``; returns metrics and (policy allowing) arrays."""
    epochs = int(config.get("epochs", 0))
    if not 1 <= epochs <= MAX_EPOCHS:
        raise PublicRefusal(f"cross-site local training needs 1 <= epochs <= {MAX_EPOCHS}")
    if rt.cfg.privacy.enabled:
        raise PublicRefusal("cross-site local training runs without DP-SGD; it is off for federations with privacy")
    work = copy.deepcopy(rt.model)
    rt.reseed(rt.cfg.train.seed + 104729 + zlib.crc32(rt.site.encode()) % 997)
    stats = train_epochs(work, rt.loaders["train"], loss_fn=rt.loss_fn,
                         optimizer=make_optimizer(work, rt.cfg.train, lr=check_number(
                             "lr", config.get("lr") or rt.cfg.train.lr, lo=0.0, hi=1.0)),
                         device=rt.device, epochs=epochs, amp=rt.cfg.train.amp, grad_clip=rt.cfg.train.grad_clip,
                         max_steps_per_epoch=rt.cfg.train.max_steps_per_epoch, desc=f"{rt.site} local model")
    path = _path(rt, check_name("federation-id", config.get("federation-id", "run")))
    save_checkpoint(path, weights=work.state_dict(), config=rt.cfg, meta={"local_model": True})
    policy = rt.site_cfg.policy.local_model
    metrics = {"num-examples": dataset_size(rt.loaders["train"].dataset), "train_loss": stats["loss"],
               "local-model-policy": POLICY_CODES[policy]}
    return metrics, (None if policy == "private" else pack(work.state_dict()))


def score_model(rt: SiteRuntime, config: dict[str, Any]) -> dict[str, Any]:
    """Step 2: test-split metrics of the sent model (or of the site's own saved local model)."""
    model = rt.model
    if str(config.get("model")) == "own":
        path = _path(rt, check_name("federation-id", config.get("federation-id", "run")))
        if not path.is_file():
            raise PublicRefusal("this site has no local model for this federation (run the train step first)")
        model = copy.deepcopy(rt.model)
        model.load_state_dict(load_checkpoint(path).weights, strict=True)
    m = evaluate(model, rt.loaders["test"], device=rt.device, n_classes=rt.n_classes, amp=rt.cfg.train.amp,
                 loss_fn=rt.loss_fn, multilabel=rt.cfg.model.multilabel)
    out = {k: v for k, v in m.items() if isinstance(v, float)}
    out["num-examples"] = int(m.get("n", 0))
    return out
