"""Patient-level bootstrap confidence intervals for :func:`fedmed.metrics.compute_metrics`.

Samples of one patient (several images of a lesion) are not independent, so the bootstrap
resamples patients, not rows (a cluster bootstrap), within each stratum (site) so every
site keeps its size in a pooled interval. Percentile intervals. Hand-rolled (~20 lines):
``scipy.stats.bootstrap`` resamples observations, not clusters, and takes one statistic
at a time, while every metric here comes from the same resampled predictions.
Each replicate's metrics come from :func:`_replicate_metrics`, numpy equivalents of
:func:`~fedmed.metrics.compute_metrics` (checked equal in tests/test_evaluate.py):
scikit-learn validates its inputs on every call, ~25 ms per ``compute_metrics`` here:
1000 replicates took 23.9 s on 320 binary rows and 41.4 s on 1000 rows of 7 classes,
against 1.3 s and 4.6 s with the numpy path (2-core CPU).

:func:`combine_site_intervals` is the server's side of federated evaluation: sites send
each metric's point value and bootstrap standard error (numbers, never rows), and the
pooled value is the example-weighted mean of the sites' values with a normal interval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

from fedmed.metrics import SCALAR_METRICS, _specificity, compute_metrics, expected_calibration_error

__all__ = ["bootstrap_metrics", "combine_site_intervals", "CI_LEVEL", "Z_95"]

CI_LEVEL = 0.95
Z_95 = 1.959964


def _cluster_index(groups: np.ndarray, strata: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per stratum: its patients' sample positions, for drawing patients."""
    out = []
    for s in np.unique(strata):
        pos = np.flatnonzero(strata == s)
        _, inv = np.unique(groups[pos], return_inverse=True)
        order = np.argsort(inv, kind="stable")
        cuts = np.flatnonzero(np.diff(inv[order])) + 1
        out.append((pos, np.split(pos[order], cuts)))
    return out


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), what ``roc_auc_score`` gives."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _replicate_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """The scalar metrics of :func:`compute_metrics` (same definitions, zero_division=0), in numpy."""
    y_pred = probs.argmax(axis=1)
    cm = np.bincount(y * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(axis=1), cm.sum(axis=0)
    present = np.flatnonzero(support)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    f1_den = support + predicted
    f1 = np.divide(2 * tp, f1_den, out=np.zeros(n_classes), where=f1_den > 0)
    spec = _specificity(cm)
    out = {"accuracy": float(tp.sum() / len(y)), "balanced_accuracy": float(recall[present].mean())}
    auc = float("nan")
    if len(present) >= 2:
        if n_classes == 2:
            auc = _auc(y == 1, probs[:, 1])
        else:  # one-vs-rest over the classes that occur, their probabilities renormalised
            p = probs[:, present]
            p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
            if len(present) == 2:
                auc = _auc(y == present[1], p[:, 1])
            else:
                auc = float(np.mean([_auc(y == c, p[:, j]) for j, c in enumerate(present)]))
    out["auc"] = auc
    if n_classes == 2:
        out.update(f1=float(f1[1]), sensitivity=float(recall[1]), specificity=float(spec[1]))
    else:
        out.update(f1=float(f1.mean()), sensitivity=float(recall[present].mean()),
                   specificity=float(np.nanmean(spec)) if np.isfinite(spec).any() else float("nan"))
    out["ece"] = expected_calibration_error(y, probs)
    return out


def bootstrap_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    groups: np.ndarray,
    strata: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_classes: int | None = None,
) -> dict[str, dict[str, float]]:
    """Point value, 95 % percentile CI and bootstrap SE of every scalar metric.

    Returns ``{metric: {"value", "lo", "hi", "se", "n_boot"}}`` where ``n_boot`` counts the
    replicates in which the metric was defined (an AUC needs two classes present). Patients
    (``groups``) are drawn with replacement within each ``strata`` value.
    """
    y_true, probs = np.asarray(y_true).astype(int), np.asarray(probs, dtype=float)
    groups = np.asarray(groups).astype(str)
    strata = np.zeros(len(y_true), dtype=int) if strata is None else np.asarray(strata).astype(str)
    n_classes = n_classes or probs.shape[1]
    point = compute_metrics(y_true, probs, n_classes=n_classes)
    keys = [k for k in SCALAR_METRICS if k in point]
    rng = np.random.default_rng(seed)
    clusters = _cluster_index(groups, strata)
    reps = np.full((n_boot, len(keys)), np.nan)
    for b in range(n_boot):
        idx = np.concatenate([np.concatenate([pats[i] for i in rng.integers(0, len(pats), len(pats))])
                              for _, pats in clusters if pats])
        m = _replicate_metrics(y_true[idx], probs[idx], n_classes)
        reps[b] = [m.get(k, np.nan) for k in keys]
    out: dict[str, dict[str, float]] = {}
    alpha = (1.0 - CI_LEVEL) / 2
    for j, k in enumerate(keys):
        col = reps[:, j][np.isfinite(reps[:, j])]
        value = float(point[k])
        if len(col) < max(20, n_boot // 10) or not math.isfinite(value):
            out[k] = {"value": value, "lo": float("nan"), "hi": float("nan"), "se": float("nan"),
                      "n_boot": int(len(col))}
            continue
        lo, hi = np.quantile(col, [alpha, 1.0 - alpha])
        out[k] = {"value": value, "lo": float(lo), "hi": float(hi), "se": float(col.std(ddof=1)),
                  "n_boot": int(len(col))}
    return out


def combine_site_intervals(per_site: dict[str, dict[str, Any]], *, keys: tuple[str, ...] = SCALAR_METRICS
                           ) -> dict[str, dict[str, float]]:
    """Pool sites' ``{metric: value, metric_se: SE, num-examples: n}`` into weighted means.

    The pooled value is ``sum(n_i m_i) / sum(n_i)`` over the sites that report the metric;
    its SE is ``sqrt(sum(w_i^2 se_i^2))`` with ``w_i = n_i / sum(n)`` (sites are independent),
    and the interval ``value ± 1.96 SE``. A site without an SE for a metric leaves that
    metric's pooled interval undefined (NaN) rather than pretending it is exact.
    """
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        rows = [(float(m[key]), m.get(f"{key}_se"), float(m.get("num-examples", 0)))
                for m in per_site.values() if isinstance(m.get(key), (int, float))]
        rows = [r for r in rows if r[2] > 0 and math.isfinite(r[0])]
        if not rows:
            continue
        total = sum(n for _, _, n in rows)
        value = sum(v * n for v, _, n in rows) / total
        ses = [float(s) for _, s, _ in rows if isinstance(s, (int, float)) and math.isfinite(s)]
        if len(ses) == len(rows):  # every site gave a finite SE
            se = math.sqrt(sum(((n / total) ** 2 * s ** 2 for (_, _, n), s in zip(rows, ses, strict=True)), 0.0))
            lo, hi = value - Z_95 * se, value + Z_95 * se
        else:
            se = lo = hi = float("nan")
        out[key] = {"value": float(value), "lo": float(lo), "hi": float(hi), "se": float(se),
                    "sites": len(rows), "n": int(total)}
    return out
