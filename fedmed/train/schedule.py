"""Learning-rate schedule shared by local training (per epoch) and federations (per round).

Linear warm-up, then cosine decay (or constant): a freshly initialised head on a pretrained
backbone sends large gradients into it in the first steps; warming up protects the
pretrained features. With ``warmup=0`` this is exactly the cosine schedule used before
(``CosineAnnealingLR`` stepped per epoch).
"""

from __future__ import annotations

import math

__all__ = ["lr_factor", "warmup_rounds"]


def lr_factor(step: int, *, total: int, warmup: int = 0, cosine: bool = True) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based epoch or round) of ``total``.

    Warm-up: ``(step + 1) / (warmup + 1)`` for ``step < warmup``; afterwards
    ``0.5 (1 + cos(π (step - warmup) / (total - warmup)))`` (or 1 without cosine).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if not cosine:
        return 1.0
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def warmup_rounds(warmup_epochs: int, local_epochs: int) -> int:
    """Rounds that cover ``warmup_epochs`` local epochs (a federation warms up per round)."""
    return math.ceil(warmup_epochs / max(local_epochs, 1)) if warmup_epochs else 0
