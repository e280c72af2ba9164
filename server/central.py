"""Central evaluation: the server scores each round's global model on its own held-out set.

The held-out set is an ordinary site folder (``federation.central_test``) kept by the
coordinator; its validation split picks the best round and its test split is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fedmed.config import FedmedConfig
from fedmed.device import select_device
from fedmed.task import load_site_bundle, make_loaders, model_from_config
from fedmed.train.loop import evaluate
from fedmed.train.losses import make_loss

__all__ = ["make_central_eval"]


def make_central_eval(
    cfg: FedmedConfig, *, progress: bool = False
) -> Callable[[dict[str, np.ndarray]], dict[str, dict[str, Any]]] | None:
    """A function ``arrays -> {"val": metrics, "test": metrics}``, or None without a central set."""
    if not cfg.federation.central_test:
        return None
    path = Path(cfg.federation.central_test)
    if not path.is_dir():
        raise FileNotFoundError(f"federation.central_test {path} is not a folder")
    bundle = load_site_bundle(cfg, site_dir=path, progress=progress)
    device = select_device(cfg.train.device)
    model = model_from_config(cfg).to(device)
    loaders = make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    loss_fn = make_loss(kind="ce", n_classes=bundle.n_classes, use_class_weights=False,
                        multilabel=cfg.model.multilabel).to(device)

    def central_eval(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()}, strict=True)
        return {split: evaluate(model, loaders[split], device=device, n_classes=bundle.n_classes,
                                amp=cfg.train.amp, loss_fn=loss_fn, multilabel=cfg.model.multilabel)
                for split in ("val", "test")}

    return central_eval
