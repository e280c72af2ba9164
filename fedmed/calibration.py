"""Temperature scaling (Guo et al. 2017) and reliability diagrams.

One scalar ``T > 0`` divides the logits; it is fitted on a validation split by minimising
the negative log-likelihood and leaves every prediction (the argmax) unchanged. Hand-rolled
(~15 lines of LBFGS on ``log T``): no maintained library ships it for plain PyTorch
(``netcal`` / ``temperature_scaling`` are unmaintained and not dependencies here).

Federated fitting: each site sends only its summed NLL on a shared grid of temperatures
(:func:`nll_curve`, numbers, no patient data); the server adds the curves and takes the
minimum (:func:`fit_temperature_from_curves`). Federated measuring: each site sends ECE and
NLL before/after and its reliability-bin statistics (:func:`measure`: per confidence bin a
count, a sum of confidences and a count of correct predictions); bins add up across sites
(:func:`combine_measures`), so the server's ECE and diagram are those of the pooled test sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedmed.errors import UsageError
from fedmed.metrics import expected_calibration_error
from fedmed.reporting.html import images, save_figure, table, write_page
from fedmed.train.loop import forward_pass

__all__ = [
    "fit_temperature",
    "collect_logits",
    "reliability_diagram",
    "calibrate",
    "nll_curve",
    "temperature_grid",
    "fit_temperature_from_curves",
    "bin_stats",
    "ece_from_bins",
    "merge_bins",
    "plot_reliability",
    "measure",
    "combine_measures",
    "BIN_KEYS",
    "MEASURE_KEYS",
    "N_BINS",
]

N_BINS = 15  # the same bins as fedmed.metrics.expected_calibration_error
BIN_KEYS = ("count", "conf", "correct")  # per bin: samples, summed confidence, correct predictions
MEASURE_KEYS = ("ece_before", "ece_after", "nll_before", "nll_after")  # what measure() compares


def _as_tensors(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(f"need logits (N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if len(y) == 0:
        raise UsageError("cannot fit a temperature on an empty set")
    return z, y


def fit_temperature(logits: Any, labels: Any, *, max_iter: int = 100) -> float:
    """The ``T > 0`` minimising the mean NLL of ``softmax(logits / T)`` (LBFGS on ``log T``).

    ``T > 1`` softens over-confident predictions, ``T < 1`` sharpens under-confident ones.
    The result is clipped to [0.05, 20]. Raises ``ValueError`` on empty or mis-shaped input.
    """
    z, y = _as_tensors(logits, labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, 0.05, 20.0)) if np.isfinite(t) else 1.0


def temperature_grid(n: int = 121, lo: float = 0.05, hi: float = 20.0) -> np.ndarray:
    """Log-spaced temperatures every site evaluates for the federated fit."""
    return np.geomspace(lo, hi, n)


def nll_curve(logits: Any, labels: Any, temperatures: np.ndarray | None = None) -> np.ndarray:
    """Summed NLL of a site's validation logits at each temperature (what a site sends)."""
    z, y = _as_tensors(logits, labels)
    ts = temperature_grid() if temperatures is None else np.asarray(temperatures, dtype=float)
    return np.array([float(F.cross_entropy(z / t, y, reduction="sum")) for t in ts])


def fit_temperature_from_curves(
    curves: list[np.ndarray], temperatures: np.ndarray | None = None
) -> float:
    """Server side of the federated fit: the grid temperature with the least total NLL."""
    if not curves:
        raise ValueError("no site sent an NLL curve")
    ts = temperature_grid() if temperatures is None else np.asarray(temperatures, dtype=float)
    total = np.sum(np.stack([np.asarray(c, dtype=float) for c in curves]), axis=0)
    if total.shape != ts.shape:
        raise ValueError(f"curves have {total.shape[0]} points, the grid {len(ts)}")
    return float(ts[int(np.argmin(total))])


def collect_logits(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Float64 logits ``(N, C)`` and labels ``(N,)`` of a loader (one :func:`forward_pass`, fp32)."""
    out = forward_pass(model, loader, device=torch.device(device), amp=False)
    return out.logits.astype(np.float64), out.labels.astype(np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def bin_stats(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = N_BINS) -> dict[str, list[float]]:
    """Per equal-width confidence bin: ``count``, summed ``conf`` and ``correct`` (top label).

    The same bins as :func:`fedmed.metrics.expected_calibration_error`; sums, not means,
    so the statistics of several sites add up to those of their pooled predictions.
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    conf = probs.max(axis=1) if len(labels) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels).astype(float) if len(labels) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    return {"count": np.bincount(bins, minlength=n_bins).astype(float).tolist(),
            "conf": np.bincount(bins, weights=conf, minlength=n_bins).tolist(),
            "correct": np.bincount(bins, weights=correct, minlength=n_bins).tolist()}


def ece_from_bins(bins: dict[str, Any]) -> float:
    """Top-label ECE from bin statistics: ``sum_b |correct_b - conf_b| / N`` (NaN when empty)."""
    count, conf, correct = (np.asarray(bins[k], dtype=float) for k in BIN_KEYS)
    n = count.sum()
    return float(np.abs(correct - conf).sum() / n) if n > 0 else float("nan")


def merge_bins(parts: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Add bin statistics of several sites; raises ``ValueError`` on different bin counts."""
    if not parts:
        raise ValueError("no bin statistics to merge")
    sizes = {len(p[k]) for p in parts for k in BIN_KEYS}
    if len(sizes) != 1:
        raise ValueError(f"bin statistics disagree on the number of bins: {sorted(sizes)}")
    return {k: np.sum([np.asarray(p[k], dtype=float) for p in parts], axis=0).tolist() for k in BIN_KEYS}


def plot_reliability(bins: dict[str, Any], *, path: str | Path, title: str) -> Path:
    """PNG from bin statistics: accuracy per confidence bin, the gap to the diagonal, sample
    counts; ECE in the title. One drawing for raw predictions and for sums over sites."""
    from matplotlib.figure import (
        Figure,  # here: sites import this module and never draw
    )

    count, conf, correct = (np.asarray(bins[k], dtype=float) for k in BIN_KEYS)
    n_bins = len(count)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    used = count > 0
    acc = np.divide(correct, count, out=np.zeros(n_bins), where=used)
    mconf = np.divide(conf, count, out=np.zeros(n_bins), where=used)
    fig = Figure(figsize=(4.8, 5.6))
    ax, axc = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers[used], acc[used], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers[used], (mconf - acc)[used], bottom=acc[used], width=width, color="tab:red",
           alpha=0.35, edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {ece_from_bins(bins):.4f} (n = {int(count.sum())})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    axc.bar(centers, count, width=width, color="gray", edgecolor="black")
    axc.set_xlabel("confidence (top class)")
    axc.set_ylabel("samples")
    return save_figure(fig, path)


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, *, path: str | Path,
                        title: str, n_bins: int = N_BINS) -> Path:
    """PNG of one set of predictions (:func:`plot_reliability` of its :func:`bin_stats`)."""
    return plot_reliability(bin_stats(probs, labels, n_bins=n_bins), path=path, title=title)


def measure(logits: Any, labels: Any, *, temperature: float) -> dict[str, int | float | list[float]]:
    """ECE, NLL and accuracy of a test split at ``T = 1`` and at ``temperature``, plus the
    reliability bins before/after: flat numbers, what a site sends (``num-examples`` = N).

    Keys: ``num-examples``, ``accuracy``, ``ece_before``, ``ece_after``, ``nll_before``,
    ``nll_after`` and ``bins_{before,after}_{count,conf,correct}`` (lists of ``N_BINS``).
    Raises ``ValueError`` on an empty or mis-shaped split.
    """
    z, y = (t.numpy() for t in _as_tensors(logits, labels))
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    out: dict[str, int | float | list[float]] = {"num-examples": int(len(y))}
    for when, t in (("before", 1.0), ("after", float(temperature))):
        p = _softmax(z / t)
        out[f"ece_{when}"] = expected_calibration_error(y, p)
        out[f"nll_{when}"] = _nll(p, y)
        for k, v in bin_stats(p, y).items():
            out[f"bins_{when}_{k}"] = v
    out["accuracy"] = float((z.argmax(1) == y).mean())
    return out


def combine_measures(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sites' :func:`measure` results → the same keys for their pooled test sets.

    Bins are summed (so ECE is that of the pooled predictions, not a mean of site ECEs);
    NLL and accuracy are example-weighted means, which for means over samples is the pooled
    value. Raises ``ValueError`` when no site has examples.
    """
    sites = [m for m in per_site.values() if float(m.get("num-examples", 0)) > 0]
    n = sum(float(m["num-examples"]) for m in sites)
    if not sites or n <= 0:
        raise ValueError("no site measured any test example")
    out: dict[str, Any] = {"num-examples": int(n)}
    for key in ("nll_before", "nll_after", "accuracy"):
        out[key] = float(sum(float(m[key]) * float(m["num-examples"]) for m in sites) / n)
    for when in ("before", "after"):
        merged = merge_bins([{k: m[f"bins_{when}_{k}"] for k in BIN_KEYS} for m in sites])
        out[f"ece_{when}"] = ece_from_bins(merged)
        out.update({f"bins_{when}_{k}": v for k, v in merged.items()})
    return out


def calibrate(
    model: nn.Module,
    val_loader: DataLoader,
    test_loader: DataLoader,
    *,
    device: torch.device | str = "cpu",
    out_dir: str | Path | None = None,
    title: str = "test",
) -> dict[str, float]:
    """Fit ``T`` on the validation loader; ECE and NLL on the test loader before and after.

    Returns ``{temperature, ece_before, ece_after, nll_before, nll_after, accuracy, n_val,
    n_test}``. With ``out_dir``: ``reliability_before.png``, ``reliability_after.png``,
    ``calibration.json`` and ``calibration.html``. Raises ``ValueError`` on an empty split.
    """
    zv, yv = collect_logits(model, val_loader, device)
    zt, yt = collect_logits(model, test_loader, device)
    if len(yv) == 0 or len(yt) == 0:
        raise UsageError(f"calibration needs non-empty val and test splits (got {len(yv)}, {len(yt)})")
    t = fit_temperature(zv, yv)
    m = measure(zt, yt, temperature=t)
    res: dict[str, float] = {"temperature": t}
    for k in (*MEASURE_KEYS, "accuracy"):
        v = m[k]
        assert not isinstance(v, list)  # measure()'s scalars (its bins are the lists)
        res[k] = v
    res.update(n_val=int(len(yv)), n_test=int(len(yt)))
    if out_dir is not None:
        out = Path(out_dir)
        for when, caption in (("before", "before"), ("after", f"after temperature scaling (T = {t:.2f})")):
            plot_reliability({k: m[f"bins_{when}_{k}"] for k in BIN_KEYS},
                             path=out / f"reliability_{when}.png", title=f"{title}: {caption}")
        (out / "calibration.json").write_text(json.dumps(res, indent=2))
        _write_html(out, res, title)
    return res


def _write_html(out: Path, res: dict[str, float], title: str) -> Path:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in res.items()]
    return write_page(out / "calibration.html", f"calibration: {title}", [
        "<p>Temperature fitted on the validation split, measured on the test split.</p>",
        table(["", "value"], rows),
        images([("reliability_before.png", "before"), ("reliability_after.png", "after")]),
    ], heading=f"Calibration: {title}")
