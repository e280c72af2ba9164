"""Central evaluation: the server scores each round's global model on its own held-out set.

The held-out set is an ordinary site folder (``federation.central_test``) kept by the
coordinator; its validation split picks the best round and its test split is reported.
After the last round the same set serves temperature scaling (:meth:`CentralSet.logits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.calibration import collect_logits
from fedmed.config import FedmedConfig
from fedmed.device import select_device
from fedmed.task import load_site_bundle, make_loaders, model_from_config
from fedmed.train.loop import evaluate
from fedmed.train.losses import make_loss

__all__ = ["make_central_eval", "CentralSet"]


class CentralSet:
    """The coordinator's held-out site, loaded once; call it with arrays for val/test metrics."""

    def __init__(self, cfg: FedmedConfig, path: Path, *, progress: bool = False) -> None:
        # Only its val/test splits are scored: no training augmentation (nor torchvision) here.
        plain = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": False})})
        bundle = load_site_bundle(plain, site_dir=path, progress=progress)
        self.cfg, self.n_classes = cfg, bundle.n_classes
        self.device = select_device(cfg.train.device)
        self.model = model_from_config(cfg).to(self.device)
        self.loaders = make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        for split in ("val", "test"):  # scoring never draws from the process's global RNG: it may run
            self.loaders[split].generator = torch.Generator()  # beside a site's training (one process)
        self.loss_fn = make_loss(kind="ce", n_classes=bundle.n_classes, use_class_weights=False,
                                 multilabel=cfg.model.multilabel).to(self.device)

    def _load(self, arrays: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()}, strict=True)

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """``{"val": metrics, "test": metrics}`` of the model with these weights."""
        self._load(arrays)
        return {split: evaluate(self.model, self.loaders[split], device=self.device, n_classes=self.n_classes,
                                amp=self.cfg.train.amp, loss_fn=self.loss_fn, multilabel=self.cfg.model.multilabel)
                for split in ("val", "test")}

    def logits(self, arrays: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
        """Float64 logits ``(N, C)`` and labels of ``split`` ("val" or "test") for calibration."""
        self._load(arrays)
        return collect_logits(self.model, self.loaders[split], self.device)


def make_central_eval(cfg: FedmedConfig, *, progress: bool = False) -> CentralSet | None:
    """The central set (a callable ``arrays -> {"val": metrics, "test": metrics}``), or None
    without ``federation.central_test``. Raises ``FileNotFoundError`` when it is not a folder."""
    if not cfg.federation.central_test:
        return None
    path = Path(cfg.federation.central_test)
    if not path.is_dir():
        raise FileNotFoundError(f"federation.central_test {path} is not a folder")
    return CentralSet(cfg, path, progress=progress)
