"""``fedmed evaluate``: external validation of a saved model on whole sites.

For each ``--site-dir`` (every row by default, or the site's own test split as a
federation splits it) the model runs with its own preprocessing (image size, channels,
window, record encoder) and its fitted temperature; every metric of
:func:`fedmed.metrics.compute_metrics` gets a patient-level bootstrap 95 % interval
(:mod:`fedmed.bootstrap`), per site and for the sites pooled (the metric of the pooled
predictions, patients resampled within each site). Writes ``evaluation.json``,
``evaluation.html``, one ROC and one reliability plot per site and for the pool.

Data that does not fit the model (labels outside its classes, images with another channel
count, records without its features) is refused before anything runs, naming what differs
(:mod:`fedmed.fit_check`). Record columns the model does not use are ignored and listed.

Records of a federated model (no encoder in the checkpoint) are encoded as every site did
in training: with statistics of the site's own patients — its training split for
``--split test``, all its rows for ``--split all`` (features only, never labels).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from fedmed.bootstrap import CI_LEVEL, bootstrap_metrics
from fedmed.checkpoint import Checkpoint
from fedmed.config import FedmedConfig
from fedmed.errors import UsageError
from fedmed.fit_check import check_site
from fedmed.metrics import SCALAR_METRICS, compute_metrics
from fedmed.predict import logits_of, probabilities
from fedmed.reporting.html import esc, images, save_figure, write_page

__all__ = ["EvalSet", "load_eval_set", "score", "evaluate_model", "write_report", "SPLITS"]

SPLITS = ("all", "test")


@dataclass
class EvalSet:
    """One site's samples as the model sees them, with labels and patient ids (kept local)."""

    name: str
    dataset: Dataset
    labels: np.ndarray
    patients: np.ndarray
    record_encoder: str
    fit: dict[str, Any]


def _loading_config(ckpt: Checkpoint, ignored: list[str], image_roots: list[str] | None = None) -> FedmedConfig:
    """The checkpoint's config, reading only what the model uses from a foreign folder;
    ``image_roots`` are this machine's folders that images.csv may point into."""
    cfg = ckpt.config
    d = cfg.data
    unused_notes = [d.notes_column] if d.notes_column and not cfg.model.notes.enabled else []
    data = d.model_copy(update={
        "root": None, "sites": None,
        "ignore_columns": list(dict.fromkeys([*d.ignore_columns, *ignored, *unused_notes])),
        "notes_column": d.notes_column if cfg.model.notes.enabled else None,
        "image_roots": list(dict.fromkeys([*d.image_roots, *(str(Path(r).resolve()) for r in image_roots or [])])),
    })
    return cfg.model_copy(update={"data": data})


def load_eval_set(ckpt: Checkpoint, site_dir: str | Path, *, split: str = "all",
                  cache_dir: str | None = None, image_roots: list[str] | None = None) -> EvalSet:
    """Check, load and encode one site for the model; raises ``DataMismatch`` if it does not fit."""
    from fedmed.data.dataset import SiteDataset
    from fedmed.data.images import ImageCache, Preprocess
    from fedmed.data.records import RecordEncoder
    from fedmed.data.site import load_site
    from fedmed.task import load_site_bundle

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {SPLITS}, got {split!r}")
    site_dir = Path(site_dir)
    variant = ckpt.config.model.variant
    fit = check_site(site_dir, ckpt.config.data, uses_images=variant != "record",
                     uses_records=variant != "image")
    cfg = _loading_config(ckpt, fit["ignored_columns"], image_roots)
    stored = ckpt.record_encoder()
    if split == "test":
        bundle = load_site_bundle(cfg, site_dir=site_dir, cache_dir=cache_dir, progress=False)
        site, rows = bundle.site, bundle.site.samples.iloc[bundle.splits.indices["test"]]
        base = bundle.splits.test
        encoder, source = (stored, "checkpoint") if stored is not None else (bundle.splits.encoder,
                                                                             "site training split")
        ds = SiteDataset(rows, site.records, encoder=encoder, spec=base.spec, cache=base.cache)
    else:
        site = load_site(site_dir, cfg.data)
        rows = site.samples
        spec = Preprocess.from_config(cfg.data)
        cache = None
        if variant != "record" and bool(rows["has_image"].any()):
            cache = ImageCache(cache_dir or cfg.data.cache_dir, spec)
            cache.prepare(rows.loc[rows["has_image"], "image_path"].tolist(), progress=False)
        if stored is not None:
            encoder, source = stored, "checkpoint"
        else:
            encoder = RecordEncoder(numeric=cfg.data.numeric, categorical=cfg.data.categorical,
                                    imputation=cfg.data.imputation).fit(site.records)
            source = "site rows"
        ds = SiteDataset(rows, site.records, encoder=encoder, spec=spec, cache=cache)
    return EvalSet(name=site.name, dataset=ds, labels=rows["label"].to_numpy().astype(int),
                   patients=(site.name + "/" + rows["patient_id"].astype(str)).to_numpy(),
                   record_encoder=source, fit=dict(fit))


def score(ckpt: Checkpoint, sets: list[EvalSet], *, n_boot: int = 1000, seed: int = 0
          ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metrics with bootstrap CIs per set and pooled; also each set's (labels, probabilities)."""
    if ckpt.config.model.multilabel:
        raise UsageError("fedmed evaluate is for single-label (softmax) models")
    model = ckpt.build_model()
    n_classes = len(ckpt.classes)
    results: dict[str, Any] = {}
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in sets:
        if len(s.labels) == 0:
            raise UsageError(f"site {s.name!r} has no samples in the chosen split")
        p = probabilities(logits_of(model, s.dataset), temperature=ckpt.calibrated_temperature)
        preds[s.name] = (s.labels, p)
        results[s.name] = _summary(s.labels, p, s.patients, None, n_classes=n_classes, n_boot=n_boot,
                                   seed=seed, classes=ckpt.classes)
        results[s.name].update(record_encoder=s.record_encoder, ignored_columns=s.fit["ignored_columns"],
                               absent_classes=s.fit["absent_classes"])
    pooled = None
    if len(sets) > 1:
        y = np.concatenate([s.labels for s in sets])
        p = np.concatenate([preds[s.name][1] for s in sets])
        strata = np.concatenate([np.full(len(s.labels), s.name, dtype=object) for s in sets])
        pooled = _summary(y, p, np.concatenate([s.patients for s in sets]), strata, n_classes=n_classes,
                          n_boot=n_boot, seed=seed, classes=ckpt.classes)
        preds["pooled"] = (y, p)
    return {"sites": results, "pooled": pooled}, preds


def _nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def _summary(y: np.ndarray, p: np.ndarray, patients: np.ndarray, strata: np.ndarray | None, *,
             n_classes: int, n_boot: int, seed: int, classes: list[str]) -> dict[str, Any]:
    point = compute_metrics(y, p, n_classes=n_classes, loss=_nll(y, p))
    cis = bootstrap_metrics(y, p, groups=patients, strata=strata, n_boot=n_boot, seed=seed, n_classes=n_classes)
    cis["loss"] = {"value": point["loss"], "lo": float("nan"), "hi": float("nan"), "se": float("nan"), "n_boot": 0}
    return {"n_samples": int(len(y)), "n_patients": int(len(np.unique(patients))),
            "label_counts": {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=n_classes), strict=True)},
            "metrics": cis, "confusion_matrix": point["confusion_matrix"]}


def evaluate_model(ckpt: Checkpoint, site_dirs: list[str | Path], *, split: str = "all", n_boot: int = 1000,
                   seed: int = 0, out_dir: str | Path | None = None,
                   image_roots: list[str] | None = None) -> dict[str, Any]:
    """Evaluate ``ckpt`` on each site (and pooled); with ``out_dir`` write JSON, HTML and plots."""
    if not site_dirs:
        raise UsageError("give at least one --site-dir")
    names = [Path(d).name for d in site_dirs]
    if len(set(names)) != len(names):
        raise UsageError(f"site folder names must be unique, got {names}")
    sets = [load_eval_set(ckpt, d, split=split, image_roots=image_roots) for d in site_dirs]
    scored, preds = score(ckpt, sets, n_boot=n_boot, seed=seed)
    result = {
        "model": ckpt.path.name, "round": ckpt.meta.get("round"), "classes": ckpt.classes,
        "temperature": ckpt.calibrated_temperature, "temperature_fitted": ckpt.temperature is not None,
        "split": split, "bootstrap": {"replicates": n_boot, "seed": seed, "level": CI_LEVEL,
                                      "unit": "patient", "pooled": "patients resampled within each site"},
        **scored,
    }
    if out_dir is not None:
        write_report(result, preds, out_dir=Path(out_dir))
    return result


# -- report -------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _plot_roc(y: np.ndarray, p: np.ndarray, classes: list[str], *, path: Path, title: str) -> Path:
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, roc_curve

    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.subplots()
    cols = [1] if len(classes) == 2 else range(len(classes))
    for c in cols:
        pos = (y == c).astype(int)
        if 0 < pos.sum() < len(pos):
            fpr, tpr, _ = roc_curve(pos, p[:, c])
            ax.plot(fpr, tpr, lw=1.4, label=f"{classes[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _cell(m: dict[str, float]) -> str:
    v, lo, hi = m.get("value"), m.get("lo"), m.get("hi")
    if v is None or not math.isfinite(v):
        return "-"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.4f}"
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"


def metrics_table(result: dict[str, Any], *, keys: tuple[str, ...] = SCALAR_METRICS) -> str:
    """A plain-text table: one row per site (and pooled), ``value [lo, hi]`` per metric."""
    rows = dict(result["sites"])
    if result.get("pooled"):
        rows["pooled"] = result["pooled"]
    cols = [k for k in keys if any(k in r["metrics"] for r in rows.values())]
    cells = {n: [_cell(r["metrics"].get(k, {})) for k in cols] for n, r in rows.items()}
    width = [max(len(c), *(len(cells[n][i]) for n in rows)) for i, c in enumerate(cols)]
    name_w = max(4, *(len(n) for n in rows))
    lines = ["site".ljust(name_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, width, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += [n.ljust(name_w) + "  " + "  ".join(v.rjust(w) for v, w in zip(cells[n], width, strict=True))
              for n in rows]
    return "\n".join(lines)


def write_report(result: dict[str, Any], preds: dict[str, tuple[np.ndarray, np.ndarray]], *, out_dir: Path) -> Path:
    """``evaluation.json``, ``evaluation.html`` and per-set ``roc_*.png`` / ``reliability_*.png``."""
    from fedmed.calibration import reliability_diagram

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, (y, p) in preds.items():
        slug = _slug(name)
        _plot_roc(y, p, result["classes"], path=out_dir / f"roc_{slug}.png", title=f"ROC: {name}")
        reliability_diagram(p, y, path=out_dir / f"reliability_{slug}.png",
                            title=f"{name} (T = {result['temperature']:.2f})")
        figures += [f"roc_{slug}.png", f"reliability_{slug}.png"]
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=float))
    e = esc
    info = "".join(f"<li>{e(n)}: {r['n_samples']} samples, {r['n_patients']} patients; record encoder from "
                   f"{e(r['record_encoder'])}; ignored columns {e(str(r['ignored_columns']))}; classes absent "
                   f"{e(str(r['absent_classes']))}</li>" for n, r in result["sites"].items())
    return write_page(out_dir / "evaluation.html", f"evaluation: {result['model']}", [
        f"<p>Split: {e(result['split'])}; temperature T = {result['temperature']:.3f} "
        f"({'fitted' if result['temperature_fitted'] else 'not fitted: plain softmax'}); "
        f"{result['bootstrap']['replicates']} patient-level bootstrap replicates (seed "
        f"{result['bootstrap']['seed']}), 95 % percentile intervals; pooled = the sites' predictions "
        "together, patients resampled within each site. Loss is the NLL of the calibrated "
        f"probabilities (no interval).</p><pre>{e(metrics_table(result))}</pre><ul>{info}</ul>",
        images(((f, f) for f in figures), kind="row"),
    ], heading=f"External validation of {result['model']}")
