"""Classification metrics clinicians ask for, computed with scikit-learn.

All functions take true class indices and predicted probabilities ``(N, C)`` so the same
numbers come out locally, at the server and in the run report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

__all__ = ["compute_metrics", "expected_calibration_error", "format_metrics", "selection_score", "MONITORS",
           "SCALAR_METRICS"]

SCALAR_METRICS = (
    "accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece", "loss",
)

#: The validation metrics a run may select its best epoch / round by (``train.monitor``).
MONITORS = ("auc", "balanced_accuracy", "loss")


def selection_score(metrics: dict[str, Any], monitor: str = "auc", *, prefix: str = "") -> float:
    """Higher-is-better score of ``metrics[prefix + monitor]`` (loss negated); NaN when undefined.

    ``auc`` falls back to ``-loss`` where AUC is undefined (one class in the validation split),
    so a run can still keep its best epoch.
    """
    if monitor not in MONITORS:
        raise ValueError(f"unknown monitor {monitor!r}; valid: {list(MONITORS)}")

    def finite(key: str) -> float | None:
        v = metrics.get(prefix + key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    if monitor != "loss":
        value = finite(monitor)
        if value is not None:
            return value
        if monitor != "auc":
            return float("nan")
    loss = finite("loss")
    return -loss if loss is not None else float("nan")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width bins.

    Hand-rolled: scikit-learn has ``calibration_curve`` but no ECE, and pulling in
    torchmetrics for ten lines is not worth a dependency.
    """
    if len(y_true) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def _specificity(cm: np.ndarray) -> np.ndarray:
    """Per-class specificity TN / (TN + FP) from a confusion matrix."""
    total = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = total - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tn + fp > 0, tn / (tn + fp), np.nan)


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    n_classes: int | None = None,
    loss: float | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC, F1, sensitivity, specificity, ECE, confusion matrix.

    Binary tasks report sensitivity/specificity/F1 of the positive class (index 1) and the
    ROC AUC of its probability; multi-class tasks report macro averages and the macro
    one-vs-rest AUC over the classes present. AUC is NaN when only one class is present.
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = n_classes or probs.shape[1]
    labels = list(range(n_classes))
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    present = np.unique(y_true)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
    }
    auc = float("nan")
    if len(present) >= 2:
        if n_classes == 2:
            auc = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            # One-vs-rest over the classes that occur: a site without any 'df' lesion
            # still gets an AUC over the others instead of an error.
            cols = [c for c in labels if c in set(present)]
            p = probs[:, cols]
            p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
            if len(cols) == 2:
                auc = float(roc_auc_score((y_true == cols[1]).astype(int), p[:, 1]))
            else:
                auc = float(roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=cols))
    out["auc"] = auc
    spec = _specificity(cm)
    if n_classes == 2:
        out["f1"] = float(f1_score(y_true, y_pred, pos_label=1, zero_division=0))
        out["sensitivity"] = float(recall_score(y_true, y_pred, pos_label=1, zero_division=0))
        out["specificity"] = float(spec[1])
    else:
        out["f1"] = float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0))
        out["sensitivity"] = float(
            recall_score(y_true, y_pred, average="macro", labels=list(present), zero_division=0)
        )
        out["specificity"] = float(np.nanmean(spec)) if np.isfinite(spec).any() else float("nan")
    out["ece"] = expected_calibration_error(y_true, probs)
    if loss is not None:
        out["loss"] = float(loss)
    out["confusion_matrix"] = cm.tolist()
    return out


def format_metrics(rows: dict[str, dict[str, Any]], *, keys: tuple[str, ...] = SCALAR_METRICS) -> str:
    """A readable aligned table: one row per name (split, site, variant), one column per metric."""
    cols = [k for k in keys if any(k in r for r in rows.values())]
    name_w = max([len("split")] + [len(n) for n in rows])
    head = "split".ljust(name_w) + "  " + "  ".join(c.rjust(max(8, len(c))) for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cell = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
            cells.append(cell.rjust(max(8, len(c))))
        lines.append(name.ljust(name_w) + "  " + "  ".join(cells))
    return "\n".join(lines)
