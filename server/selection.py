"""Which round of a federation is its best: ``train.monitor`` on validation data, never on a test split.

The round driver keeps ``best_model.pt`` and decides early stopping by it; the report names the
same round. The central validation set is used where the coordinator holds one, else the
sites' val splits (their evaluation replies carry ``val_`` metrics, weighted into ``fed_val_``).
"""

from __future__ import annotations

import math
from typing import Any

from fedmed.metrics import selection_score

__all__ = ["best_round", "selection"]


def selection(row: dict[str, Any], monitor: str) -> tuple[str, float]:
    """The metric round ``row`` is judged by and its higher-is-better score (NaN: not judged)."""
    prefix = "central_val_" if any(k.startswith("central_val_") for k in row) else "fed_val_"
    return prefix + monitor, selection_score(row, monitor, prefix=prefix)


def best_round(history: list[dict[str, Any]], monitor: str) -> tuple[int | None, str, float | None]:
    """The first round with the highest score, the metric's name and its value as reported."""
    best: tuple[int | None, str, float | None] = (None, "", None)
    top = -math.inf
    for row in history:
        metric, score = selection(row, monitor)
        if math.isfinite(score) and score > top:
            top, best = score, (int(row["round"]), metric, float(row[metric]))
    return best
