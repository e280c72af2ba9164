"""Patient-level bootstrap confidence intervals for :func:`fedmed.metrics.compute_metrics`.

Samples of one patient (several images of a lesion) are not independent, so the bootstrap
resamples patients, not rows (a cluster bootstrap), within each stratum (site) so every
site keeps its size in a pooled interval. Percentile intervals. Hand-rolled (~20 lines):
``scipy.stats.bootstrap`` resamples observations, not clusters, and takes one statistic
at a time, while every metric here comes from the same resampled predictions.

:func:`combine_site_intervals` is the server's side of federated evaluation: sites send
each metric's point value and bootstrap standard error (numbers, never rows), and the
pooled value is the example-weighted mean of the sites' values with a normal interval.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from fedmed.metrics import SCALAR_METRICS, compute_metrics

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true" per replicate
        for b in range(n_boot):
            idx = np.concatenate([np.concatenate([pats[i] for i in rng.integers(0, len(pats), len(pats))])
                                  for _, pats in clusters if pats])
            m = compute_metrics(y_true[idx], probs[idx], n_classes=n_classes)
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
