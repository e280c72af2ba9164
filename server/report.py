"""A self-contained HTML report of a federation, plus a text table for the terminal.

Built from ``FederationState.history`` (and its ``calibration``) alone, so it can be re-made
from a checkpoint after the run. Every key of a round may be missing (no central test set, evaluation off, a
round where every site failed); what is missing is left out, never an error. Figures use
matplotlib's object API (``Figure``, Agg canvas), so no GUI backend or pyplot state; it is
imported where a figure is drawn, so the coordinator does not load it before round 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.calibration import BIN_KEYS, MEASURE_KEYS, plot_reliability
from fedmed.reporting.html import esc, image, images, save_figure, table, write_page
from fedmed.server.selection import best_round

__all__ = ["write_report", "summary_table"]

SITE_COLUMNS = (("n", "num-examples"), ("accuracy", "accuracy"), ("balanced acc.", "balanced_accuracy"),
                ("AUC", "auc"), ("F1", "f1"), ("sensitivity", "sensitivity"),
                ("specificity", "specificity"), ("ECE", "ece"))
ROUND_COLUMNS = ("central_val_auc", "central_val_balanced_accuracy", "central_test_auc",
                 "central_test_balanced_accuracy", "fed_auc", "fed_balanced_accuracy",
                 "fed_worst_auc", "fed_worst_balanced_accuracy", "train_loss", "seconds")
TERMINAL_COLUMNS = (("val AUC", "central_val_auc"), ("test AUC", "central_test_auc"),
                    ("test bAcc", "central_test_balanced_accuracy"), ("fed AUC", "fed_auc"),
                    ("worst AUC", "fed_worst_auc"), ("fed bAcc", "fed_balanced_accuracy"),
                    ("train loss", "train_loss"), ("seconds", "seconds"))


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _fmt(v: Any, digits: int = 4) -> str:
    x = _num(v)
    if x is None:
        return "-"
    return str(int(x)) if isinstance(v, int) else f"{x:.{digits}f}"


def _series(history: list[dict[str, Any]], get: Any) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        y = _num(get(row))
        if y is not None:
            xs.append(int(row.get("round", i + 1)))
            ys.append(y)
    return xs, ys


def _sites(history: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in history:
        for s in (row.get("per_site") or {}):
            names[str(s)] = None
    return list(names)


# -- figures ------------------------------------------------------------------------
def _plot_lines(ax: Any, history: list[dict[str, Any]], lines: Sequence[tuple[str, Any]]) -> int:
    drawn = 0
    for label, get in lines:
        xs, ys = _series(history, get)
        if ys:
            ax.plot(xs, ys, marker="o", label=label)
            drawn += 1
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return drawn


def _curves(history: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_auc, ax_bacc = fig.subplots(1, 2)
    _plot_lines(ax_auc, history, [(name, lambda r, k=key: r.get(k)) for name, key in (
        ("central val", "central_val_auc"), ("central test", "central_test_auc"),
        ("sites, weighted mean", "fed_auc"), ("worst site", "fed_worst_auc"))])
    ax_auc.set_title("AUC")
    _plot_lines(ax_bacc, history, [(name, lambda r, k=key: r.get(k)) for name, key in (
        ("central val", "central_val_balanced_accuracy"), ("central test", "central_test_balanced_accuracy"),
        ("sites, weighted mean", "fed_balanced_accuracy"), ("worst site", "fed_worst_balanced_accuracy"))])
    ax_bacc.set_title("balanced accuracy")
    return save_figure(fig, path)


def _site_metric(site: str, metric: str) -> Any:
    return lambda r: (r.get("per_site") or {}).get(site, {}).get(metric)


def _sites_plot(history: list[dict[str, Any]], sites: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_auc, ax_bacc = fig.subplots(1, 2)
    _plot_lines(ax_auc, history, [(s, _site_metric(s, "auc")) for s in sites])
    ax_auc.set_title("AUC per site")
    _plot_lines(ax_bacc, history, [(s, _site_metric(s, "balanced_accuracy")) for s in sites])
    ax_bacc.set_title("balanced accuracy per site")
    return save_figure(fig, path)


def _square(cm: Any) -> np.ndarray | None:
    try:
        a = np.asarray(cm, dtype=float)
    except (TypeError, ValueError):
        return None
    if a.ndim == 1:
        k = int(round(math.sqrt(a.size)))
        if k * k != a.size or k == 0:
            return None
        a = a.reshape(k, k)
    return a if a.ndim == 2 and a.shape[0] == a.shape[1] and a.size else None


def _confusion(history: list[dict[str, Any]]) -> tuple[np.ndarray | None, str]:
    """The last round's central test matrix, else the sum of the sites' matrices."""
    if not history:
        return None, ""
    last = history[-1]
    cm = _square(last.get("central_test_confusion_matrix"))
    if cm is not None:
        return cm, f"central test set, round {last.get('round', len(history))}"
    total: np.ndarray | None = None
    for metrics in (last.get("per_site") or {}).values():
        m = _square(metrics.get("confusion_matrix"))
        if m is not None and (total is None or m.shape == total.shape):
            total = m if total is None else total + m
    return total, f"sum over sites, round {last.get('round', len(history))}"


def _confusion_plot(cm: np.ndarray, classes: list[str], where: str, path: Path) -> Path:
    k = cm.shape[0]
    names = list(classes) if len(classes) == k else [str(i) for i in range(k)]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.9 * k + 2.5), max(3.5, 0.9 * k + 2)))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({where})", fontsize=9)
    hi = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]:g}", ha="center", va="center",
                    color="white" if hi and cm[i, j] > hi / 2 else "black", fontsize=8)
    return save_figure(fig, path)


def _epsilon_plot(history: list[dict[str, Any]], sites: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    _plot_lines(ax, history, [(s, _site_metric(s, "epsilon")) for s in sites])
    ax.set_ylabel("ε spent")
    ax.set_title("differential privacy budget per site")
    return save_figure(fig, path)


# -- HTML ---------------------------------------------------------------------------
def _config_text(config: dict[str, Any]) -> str:
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    except Exception:  # noqa: BLE001 - a non-YAML-able value still gets shown
        import json

        return json.dumps(config, indent=2, default=str)


def _summary_rows(history: list[dict[str, Any]], calibration: dict[str, Any] | None = None, *,
                  monitor: str = "auc") -> list[tuple[str, str]]:
    best, key, score = best_round(history, monitor)
    rows = [("rounds run", str(len(history)))]
    if best is not None:
        rows.append(("best round", f"{best} ({key} = {_fmt(score)})"))
    last = history[-1] if history else {}
    if isinstance(last.get("early_stop"), str):  # federation.early_stopping_rounds ended the run
        rows.append(("stopped early", last["early_stop"]))
    for k, v in last.items():
        if k.startswith("central_test_") and _num(v) is not None:
            rows.append((f"final test {k[len('central_test_'):]}", _fmt(v)))
    if isinstance(calibration, dict) and _num(calibration.get("temperature")) is not None:
        pooled = calibration.get("pooled") or calibration.get("central_test") or {}
        rows.append(("calibration temperature", f"{_fmt(calibration['temperature'], 3)} (ECE "
                     f"{_fmt(pooled.get('ece_before'))} → {_fmt(pooled.get('ece_after'))})"))
    return rows


def _site_rows(history: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    last = history[-1] if history else {}
    per_site = last.get("per_site") or {}
    has_eps = any("epsilon" in (m or {}) for m in per_site.values())
    header = ["site", *(h for h, _ in SITE_COLUMNS)] + (["ε"] if has_eps else [])
    rows = []
    for site, m in per_site.items():
        m = m or {}
        n = _num(m.get("num-examples"))
        cells = [str(site), "-" if n is None else str(int(n)),
                 *(_fmt(m.get(k)) for _, k in SITE_COLUMNS[1:])]
        if has_eps:
            cells.append(_fmt(m.get("epsilon"), 2))
        rows.append(cells)
    return header, rows


# A site's refusal (fedmed.messages.describe_error) starts with one of these kinds.
REFUSAL_KINDS = ("policy", "budget", "app-refused")


def _what(reason: str, default: str) -> str:
    kind = reason.split(" ", 1)[0]
    return "refused by the site" if kind in REFUSAL_KINDS else default


def _problem_rows(history: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for i, row in enumerate(history):
        rnd = str(row.get("round", i + 1))
        for site, reason in (row.get("sites_rejected") or {}).items():
            rows.append([rnd, str(site), _what(str(reason), "update rejected"), str(reason)])
        failed = row.get("sites_eval_failed") or {}
        for site, reason in (failed.items() if isinstance(failed, dict) else ((s, "") for s in failed)):
            rows.append([rnd, str(site), _what(str(reason), "evaluation failed"), str(reason)])
    return rows


def site_problems(history: list[dict[str, Any]]) -> dict[str, str]:
    """Each site's latest refusal or failure over the run (for summary.json and the console)."""
    out: dict[str, str] = {}
    for rnd, site, what, reason in _problem_rows(history):
        out[site] = f"round {rnd}: {what}" + (f": {reason}" if reason else "")
    return out


# -- calibration ----------------------------------------------------------------------
CALIBRATION_COLUMNS = ("n", "ECE before", "ECE after", "NLL before", "NLL after")


def _calibration_rows(cal: dict[str, Any]) -> list[list[str]]:
    groups = [("all sites (pooled)", cal.get("pooled"))]
    groups += [(f"site {s}", m) for s, m in sorted((cal.get("sites") or {}).items())]
    groups.append(("central test set", cal.get("central_test")))
    return [[name, _fmt(m.get("num-examples")), *(_fmt(m.get(k)) for k in MEASURE_KEYS)]
            for name, m in groups if isinstance(m, dict)]


def _calibration_fit(cal: dict[str, Any]) -> str:
    fit = cal.get("fit") or {}
    if cal.get("method") == "central":
        how = f"centrally, on the server's held-out val split ({_fmt(fit.get('num-examples'))} examples)"
    else:
        sites = list(fit.get("sites") or [])
        how = (f"federated, on the val splits of {len(sites)} site{'s' if len(sites) != 1 else ''} "
               f"({', '.join(map(str, sites))}; {_fmt(fit.get('num-examples'))} examples; each site sent "
               "only its summed NLL at a grid of temperatures)")
    return f"T = {_fmt(cal.get('temperature'), 3)} for {cal.get('model', 'the model')} (round " \
           f"{cal.get('round', '-')}), fitted {how}."


def _reliability_plots(cal: dict[str, Any], out_dir: Path) -> list[tuple[str, Path]]:
    """Before/after PNGs for the sites' pooled test sets and for the central test set."""
    t = _num(cal.get("temperature"))
    plots = []
    for key, name, label in (("pooled", "reliability", "sites' test sets, pooled"),
                             ("central_test", "reliability_central", "central test set")):
        m = cal.get(key)
        if not isinstance(m, dict):
            continue
        for when, caption in (("before", "before"), ("after", f"after T = {t:.2f}" if t else "after")):
            bins = {k: m.get(f"bins_{when}_{k}") for k in BIN_KEYS}
            if all(isinstance(v, list) and v for v in bins.values()):
                plots.append((f"{label}, {caption}", plot_reliability(
                    bins, path=out_dir / f"{name}_{when}.png", title=f"{label}: {caption}")))
    return plots


def _calibration_section(cal: dict[str, Any], out_dir: Path) -> list[str]:
    e = esc
    parts = ["<h2>Calibration</h2>"]
    if cal.get("skipped"):
        return parts + [f"<p>Skipped: {e(str(cal['skipped']))}.</p>"]
    if _num(cal.get("temperature")) is None:
        parts.append(f"<p>No temperature was fitted: {e(str(cal.get('error', 'unknown reason')))}.</p>")
    else:
        parts.append(f"<p>Temperature scaling: {e(_calibration_fit(cal))} Logits are divided by T; "
                     "predicted classes (accuracy, AUC) do not change. ECE (15 equal-width bins) and "
                     "NLL on the test splits, before (T = 1) and after:</p>")
        parts.append(table(["", *CALIBRATION_COLUMNS], _calibration_rows(cal)))
    failed = [[step, str(site), str(reason)] for step, group in
              (("fit", (cal.get("fit") or {}).get("sites_failed")), ("measure", cal.get("sites_failed")))
              for site, reason in (group or {}).items()]
    if failed:
        parts += ["<p>Sites left out:</p>", table(["step", "site", "reason"], failed)]
    plots = _reliability_plots(cal, out_dir)
    if plots:
        parts.append(images((path, f"reliability diagram, {caption}") for caption, path in plots))
    return parts


def write_report(
    history: list[dict[str, Any]],
    *,
    out_dir: Path,
    title: str,
    classes: list[str],
    config: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    sections: list[str] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and its PNGs; returns the HTML's path.

    ``sections``: ready HTML blocks (e.g. personalisation) placed before the configuration.

    Images: ``curves.png``, ``sites.png`` (when sites were evaluated),
    ``confusion_matrix.png`` (when a matrix exists), ``epsilon.png`` (when a site reported ε),
    and with a ``calibration`` result (``FederationState.calibration``) a Calibration section
    with ``reliability_{before,after}.png`` (sites pooled) and
    ``reliability_central_{before,after}.png`` (central test set) where it has their bins.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = _sites(history)
    figures = [("Headline metrics per round", _curves(history, out_dir / "curves.png"))]
    if sites:
        figures.append(("Per-site metrics per round", _sites_plot(history, sites, out_dir / "sites.png")))
    cm, where = _confusion(history)
    if cm is not None:
        figures.append(("Confusion matrix", _confusion_plot(cm, classes, where, out_dir / "confusion_matrix.png")))
    if any("epsilon" in (m or {}) for row in history for m in (row.get("per_site") or {}).values()):
        figures.append(("Privacy budget", _epsilon_plot(history, sites, out_dir / "epsilon.png")))

    e = esc
    parts = ["<h2>Summary</h2>", table(["", "value"], _summary_rows(
        history, calibration, monitor=str(((config or {}).get("train") or {}).get("monitor", "auc"))))]
    if sites:
        header, rows = _site_rows(history)
        last_round = history[-1].get("round", len(history)) if history else "-"
        parts += [f"<h2>Sites, round {e(str(last_round))}</h2>", table(header, rows)]
    cols = [c for c in ROUND_COLUMNS if any(_num(r.get(c)) is not None for r in history)]
    round_rows = [[str(r.get("round", i + 1)), str(len(r.get("sites_trained") or [])),
                   *(_fmt(r.get(c)) for c in cols)] for i, r in enumerate(history)]
    parts += ["<h2>Rounds</h2>", table(["round", "sites trained", *cols], round_rows)]
    problems = _problem_rows(history)
    parts.append("<h2>Rejected and failed sites</h2>")
    parts.append(table(["round", "site", "what", "reason"], problems) if problems else "<p>none</p>")
    for caption, path in figures:
        parts.append(f"<h2>{e(caption)}</h2>{image(path, caption)}")
    if isinstance(calibration, dict):
        parts += _calibration_section(calibration, out_dir)
    parts += list(sections or [])
    if config is not None:
        parts += ["<h2>Configuration</h2>", f"<pre>{e(_config_text(config))}</pre>"]
    return write_page(out_dir / "report.html", title, parts)


def summary_table(history: list[dict[str, Any]]) -> str:
    """Per-round headline numbers as an aligned text table (columns no round has are left out)."""
    cols = [(h, k) for h, k in TERMINAL_COLUMNS if any(_num(r.get(k)) is not None for r in history)]
    header = ["round", "sites", "rejected", *(h for h, _ in cols)]
    rows = []
    for i, r in enumerate(history):
        trained = len(r.get("sites_trained") or [])
        connected = r.get("sites_connected")
        sites = f"{trained}/{connected}" if connected is not None else str(trained)
        rows.append([str(r.get("round", i + 1)), sites, str(len(r.get("sites_rejected") or {})),
                     *(_fmt(r.get(k)) for _, k in cols)])
    widths = [max(len(h), *(len(row[j]) for row in rows)) if rows else len(h) for j, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
