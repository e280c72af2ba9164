"""train.monitor: the validation metric a run keeps its best epoch by."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fedmed.config import TrainConfig
from fedmed.metrics import selection_score
from fedmed.train import loop


def test_selection_score_is_higher_is_better():
    m = {"auc": 0.8, "balanced_accuracy": 0.4, "loss": 0.7}
    assert selection_score(m, "auc") == 0.8
    assert selection_score(m, "balanced_accuracy") == 0.4
    assert selection_score(m, "loss") == -0.7
    assert selection_score({"val_auc": 0.9}, "auc", prefix="val_") == 0.9
    # AUC undefined (one class in the split): fall back to -loss; bAcc has no such fallback
    assert selection_score({"auc": math.nan, "loss": 0.5}, "auc") == -0.5
    assert math.isnan(selection_score({"balanced_accuracy": math.nan, "loss": 0.5}, "balanced_accuracy"))
    with pytest.raises(ValueError, match="unknown monitor"):
        selection_score(m, "accuracy")
    with pytest.raises(ValueError):
        TrainConfig(monitor="accuracy")


class _Tiny(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([float(i)]), "label": torch.tensor(1)}


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x * 0, x * 0 + self.w], dim=1)


@pytest.mark.parametrize(("monitor", "best"), [("auc", 2), ("balanced_accuracy", 3), ("loss", 4)])
def test_fit_keeps_the_epoch_with_the_best_monitored_metric(monkeypatch, monitor, best):
    """Validation metrics are scripted per epoch: each monitor restores its own best epoch."""
    scripted = iter([
        {"auc": 0.6, "balanced_accuracy": 0.50, "loss": 0.9},
        {"auc": 0.9, "balanced_accuracy": 0.55, "loss": 0.8},
        {"auc": 0.8, "balanced_accuracy": 0.70, "loss": 0.7},
        {"auc": 0.7, "balanced_accuracy": 0.60, "loss": 0.6},
    ])
    weights: list[float] = []

    def fake_evaluate(model, *_a, **_k):
        weights.append(float(model.w.detach()))
        return dict(next(scripted))

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    model = _Model()
    data = DataLoader(_Tiny(), batch_size=4)
    cfg = TrainConfig(epochs=4, patience=0, lr=0.1, monitor=monitor, progress=False, scheduler="none")
    res = loop.fit(model, data, data, cfg=cfg, loss_fn=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"),
                   n_classes=2)
    assert res.best_epoch == best
    assert float(model.w.detach()) == pytest.approx(weights[best - 1])  # that epoch's weights are restored
    assert len(set(weights)) == 4  # the weights did move every epoch


def test_patience_counts_epochs_without_a_better_monitored_metric(monkeypatch):
    vals = iter([{"balanced_accuracy": b, "auc": 0.9 - 0.1 * i} for i, b in enumerate([0.5, 0.6, 0.6, 0.59, 0.7])])
    monkeypatch.setattr(loop, "evaluate", lambda *_a, **_k: next(vals))
    data = DataLoader(_Tiny(), batch_size=4)
    cfg = TrainConfig(epochs=5, patience=2, monitor="balanced_accuracy", progress=False)
    res = loop.fit(_Model(), data, data, cfg=cfg, loss_fn=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"),
                   n_classes=2)
    assert res.stopped_early and res.best_epoch == 2 and len(res.history) == 4
