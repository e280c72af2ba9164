"""Losses for imbalanced clinical labels: weighted cross-entropy, focal loss, or logit-adjusted
cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed.errors import UsageError

__all__ = ["FocalLoss", "LogitAdjustedLoss", "class_weights_from_counts", "make_loss"]


def class_weights_from_counts(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1; absent classes get weight 0."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    present = w[counts > 0]
    if present.size:
        w = w / present.mean()
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017) on softmax outputs.

    Hand-rolled: torchvision ships only the sigmoid (binary) variant.
    """

    weight: torch.Tensor | None  # a buffer (moves with .to(device)), not a parameter

    def __init__(self, *, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - logp_t.exp()) ** self.gamma) * logp_t
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum().clamp_min(1e-12)
        return loss.mean()


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + tau * log(prior)`` (Menon et al., "Long-tail learning via logit
    adjustment", ICLR 2021): the model's own logits then estimate the class-conditional evidence, so
    their argmax targets *balanced* accuracy without re-weighting samples.

    In a federation each site adjusts by its *own* label prior (a local count, never sent), so a
    site with 94 % of one class does not teach the shared model that prior; a class absent at a site
    gets no gradient there. Under DP-SGD it does not help (measured on HAM10000, docs/results.md):
    per-sample clipping caps the large gradients of rare-class samples that the adjustment, like a
    class weight, relies on. Hand-rolled: no maintained library ships it (one line of arithmetic).
    """

    log_prior: torch.Tensor  # a buffer

    def __init__(self, counts: np.ndarray, *, tau: float = 1.0) -> None:
        super().__init__()
        counts = np.asarray(counts, dtype=np.float64)
        prior = counts / max(counts.sum(), 1.0)
        # an absent class gets a prior of 1e-12: its adjusted logit is ~28 below the rest
        self.register_buffer("log_prior", torch.tensor(tau * np.log(np.maximum(prior, 1e-12)),
                                                       dtype=torch.float32), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.log_prior, target)


class _MultiLabelBCE(nn.Module):
    """Sigmoid outputs for multi-label heads; single-label targets become one-hot."""

    pos_weight: torch.Tensor | None  # a buffer

    def __init__(self, n_classes: int, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            target = F.one_hot(target, self.n_classes)
        return F.binary_cross_entropy_with_logits(
            logits.float(), target.float(), pos_weight=self.pos_weight
        )


def make_loss(
    *,
    kind: str,
    n_classes: int,
    class_counts: np.ndarray | None = None,
    use_class_weights: bool = True,
    focal_gamma: float = 2.0,
    logit_adjust_tau: float = 1.0,
    multilabel: bool = False,
) -> nn.Module:
    """The training loss named in config (``ce``, ``focal`` or ``logit_adjusted``); ``ce`` and
    ``focal`` class-weighted when asked, ``logit_adjusted`` balanced by the label prior instead."""
    if kind == "logit_adjusted" and not multilabel:
        if class_counts is None:
            raise UsageError("loss logit_adjusted needs the training split's class counts")
        return LogitAdjustedLoss(class_counts, tau=logit_adjust_tau)
    weight = None
    if use_class_weights and class_counts is not None:
        weight = class_weights_from_counts(class_counts)
    if multilabel:
        return _MultiLabelBCE(n_classes, weight)
    if kind == "focal":
        return FocalLoss(gamma=focal_gamma, weight=weight)
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weight)
    raise UsageError(f"unknown loss {kind!r}; valid: 'ce', 'focal', 'logit_adjusted'")
