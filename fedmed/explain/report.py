"""``fedmed explain``'s report: run the methods over a site's test split, write figures and a page.

For a site's test split: one PNG per case (image + Grad-CAM overlay), one bar chart of
record-field attention per case, a modality-contribution chart, ``explain.json`` and an
HTML page. Nothing written carries a patient id or an image file name: cases are numbered.
Figures use matplotlib's object API (``Figure``), as ``server/report.py`` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset

from fedmed.checkpoint import load_checkpoint as read_checkpoint
from fedmed.config import FedmedConfig
from fedmed.errors import UsageError
from fedmed.explain._batch import model_inputs
from fedmed.explain.attribution import modality_contribution, record_attention
from fedmed.explain.gradcam import central_mass, grad_cam
from fedmed.heldout import site_split, trained_pooled
from fedmed.models.fusion import FusionModel
from fedmed.reporting.html import esc, image, images, save_figure, table, write_page

__all__ = ["explain", "summarise_sites", "summary_table", "format_value"]


# -- figures --------------------------------------------------------------------------------
def _to_display(pixels: torch.Tensor) -> np.ndarray:
    img = pixels.detach().cpu().float().numpy()
    return img[0] if img.shape[0] == 1 else np.clip(img.transpose(1, 2, 0), 0, 1)


def _case_png(path: Path, pixels: torch.Tensor, cam: np.ndarray | None, title: str) -> Path:
    disp = _to_display(pixels)
    cmap = "gray" if disp.ndim == 2 else None
    fig = Figure(figsize=(6.4, 3.5))
    left, right = fig.subplots(1, 2)
    left.imshow(disp, cmap=cmap, vmin=0, vmax=1)
    left.set_title("image", fontsize=9)
    right.imshow(disp, cmap=cmap, vmin=0, vmax=1)
    if cam is not None:
        im = right.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        fig.colorbar(im, ax=right, fraction=0.046, pad=0.04)
        right.set_title("Grad-CAM", fontsize=9)
    else:
        right.set_title("no image explanation", fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _record_png(path: Path, names: list[str], weights: np.ndarray, title: str) -> Path:
    fig = Figure(figsize=(6.0, 0.35 * len(names) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(weights), color="tab:blue")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(0.05, float(np.nanmax(weights)) * 1.1) if np.isfinite(weights).any() else 1)
    ax.set_xlabel("share of CLS attention (last record layer)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def _contrib_png(path: Path, labels: list[str], img: np.ndarray, rec: np.ndarray) -> Path:
    fig = Figure(figsize=(6.5, 0.32 * len(labels) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(labels))
    a, b = np.nan_to_num(img), np.nan_to_num(rec)
    ax.barh(y, a, color="tab:orange", label="image")
    ax.barh(y, b, left=a, color="tab:blue", label="record")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the prediction (masking each modality)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("modality contribution", fontsize=10)
    return save_figure(fig, path)


# -- explain --------------------------------------------------------------------------------
def _feature_labels(cfg: FedmedConfig, cat_row: np.ndarray) -> list[str]:
    names = list(cfg.data.numeric)
    for (col, vocab), idx in zip(cfg.data.categorical.items(), cat_row, strict=True):
        value = vocab[int(idx) - 1] if 0 < int(idx) <= len(vocab) else "missing"
        names.append(f"{col} = {value}")
    return names


def _run_all(model: FusionModel, data: Dataset, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Predictions, contributions and (image models) Grad-CAM central mass for a whole split."""
    keys: dict[str, list[np.ndarray]] = {}
    has_image_branch = getattr(model, "image_branch", None) is not None
    for batch in DataLoader(data, batch_size=batch_size):
        res = modality_contribution(model, batch)
        with torch.no_grad():
            probs = torch.softmax(model(**model_inputs(model, batch)).float(), dim=1).cpu().numpy()
        res["probs"] = probs
        res["label"] = batch["label"].numpy()
        res["has_image"] = batch["has_image"].numpy() > 0
        if has_image_branch:
            cams = grad_cam(model, batch)
            res["central_mass"] = np.array([central_mass(c) for c in cams])
        for k, v in res.items():
            keys.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in keys.items()}


def _pick(stats: dict[str, np.ndarray], patients: int | list[int], errors: int) -> list[int]:
    n = len(stats["label"])
    if errors > 0:
        wrong = np.flatnonzero(stats["pred"] != stats["label"])
        conf = stats["probs"][wrong, stats["pred"][wrong]]
        return [int(i) for i in wrong[np.argsort(-conf, kind="stable")][:errors]]
    if isinstance(patients, int):
        return list(range(min(patients, n)))
    bad = [i for i in patients if not 0 <= int(i) < n]
    if bad:
        raise UsageError(f"test-sample positions {bad} out of range (the split has {n})")
    return [int(i) for i in patients]


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def format_value(v: Any) -> str:
    """A number as the page and the terminal show it: 3 decimals, ``-`` for missing or NaN."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (
        f"{v:.3f}" if isinstance(v, float) else str(v))


def explain(
    checkpoint: str | Path,
    *,
    site_dir: str | Path,
    out_dir: str | Path,
    config_path: str | Path | None = None,
    patients: int | list[int] = 8,
    errors: int = 0,
    pooled: bool | None = None,
) -> Path:
    """Explain a checkpoint's predictions on a site's test split; returns ``explain.html``.

    Cases are the first ``patients`` test samples (or the listed test-sample positions), or,
    with ``errors > 0``, the ``errors`` most confident mistakes. Writes ``case_<k>.png``
    (image | Grad-CAM overlay), ``record_<k>.png`` (record-field attention),
    ``contributions.png``, ``explain.json`` (numbers only) and ``explain.html``; no patient
    id or file name appears in any of them. Site-level means cover the whole test split.
    ``pooled`` (default: read from the ``metrics.json`` beside a local checkpoint) selects
    the pooled split, see :func:`fedmed.heldout.site_split`.
    """
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint, config_path=config_path)
    model, cfg = ckpt.build_model(), ckpt.config
    if cfg.model.multilabel:
        raise UsageError("fedmed explain supports single-label (softmax) models only")
    pooled = trained_pooled(checkpoint) if pooled is None else pooled
    data = site_split(cfg, site_dir, split="test", pooled=pooled, encoder_state=ckpt.encoder)
    if len(data) == 0:
        raise UsageError(f"the test split of {site_dir} is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(cfg.data.classes)
    stats = _run_all(model, data)
    chosen = _pick(stats, patients, errors)
    has_img, has_rec = model.image_branch is not None, model.record_branch is not None

    cases: list[dict[str, Any]] = []
    for k, i in enumerate(chosen, start=1):
        sample = data[i]
        batch = {key: v.unsqueeze(0) for key, v in sample.items()}
        pred, true = int(stats["pred"][i]), int(stats["label"][i])
        p = float(stats["probs"][i, pred])
        title = f"case {k}: true {classes[true]}, predicted {classes[pred]} (p = {p:.2f})"
        cam = grad_cam(model, batch)[0] if has_img and stats["has_image"][i] else None
        row: dict[str, Any] = {
            "case": k, "true": classes[true], "predicted": classes[pred], "p": p,
            "correct": pred == true,
            "image_share": float(stats["share_image"][i]), "record_share": float(stats["share_record"][i]),
            "central_mass": central_mass(cam) if cam is not None else float("nan"),
            "images": [_case_png(out / f"case_{k}.png", sample["image"], cam, title).name],
        }
        if has_rec and float(sample["has_record"]) > 0 and cfg.data.numeric + list(cfg.data.categorical):
            w = record_attention(model, batch)[0]
            names = _feature_labels(cfg, sample["cat"].numpy())
            row["images"].append(_record_png(out / f"record_{k}.png", names, w,
                                             f"case {k}: record-field attention").name)
            row["record_attention"] = dict(zip([*cfg.data.numeric, *cfg.data.categorical],
                                               map(float, w), strict=True))
        cases.append(row)

    correct = stats["pred"] == stats["label"]
    site = {
        "test_samples": int(len(correct)),
        "accuracy": float(correct.mean()),
        "mean_image_share": _nanmean(stats["share_image"]),
        "mean_record_share": _nanmean(stats["share_record"]),
    }
    if "central_mass" in stats:
        cm = stats["central_mass"][correct & stats["has_image"]]
        cm = cm[np.isfinite(cm)]
        site["central_mass_correct_mean"] = float(cm.mean()) if len(cm) else float("nan")
        site["central_mass_correct_above_uniform"] = float((cm > 0.25).mean()) if len(cm) else float("nan")
        site["central_mass_correct_above_half"] = float((cm > 0.5).mean()) if len(cm) else float("nan")
        site["central_mass_correct_n"] = int(len(cm))
        shown = [c["central_mass"] for c in cases if c["correct"] and math.isfinite(c["central_mass"])]
        site["central_mass_cases_correct_mean"] = float(np.mean(shown)) if shown else float("nan")
        site["central_mass_cases_correct_above_uniform"] = (
            float(np.mean([s > 0.25 for s in shown])) if shown else float("nan"))
    labels = [f"case {c['case']}" for c in cases] + ["site mean"]
    _contrib_png(out / "contributions.png", labels,
                 np.array([c["image_share"] for c in cases] + [site["mean_image_share"]]),
                 np.array([c["record_share"] for c in cases] + [site["mean_record_share"]]))
    (out / "explain.json").write_text(json.dumps(
        {"checkpoint": checkpoint.name, "site": Path(site_dir).name, "variant": cfg.model.variant,
         "pooled_split": pooled, "site_summary": site, "cases": cases}, indent=2, default=float))
    return _write_html(out, cfg, checkpoint, Path(site_dir).name, site, cases)


def _write_html(out: Path, cfg: FedmedConfig, checkpoint: Path, site_name: str,
                site: dict[str, Any], cases: list[dict[str, Any]]) -> Path:
    e = esc
    head = ["case", "true", "predicted", "p", "image share", "record share", "central mass"]
    rows = [[format_value(c[k]) for k in ("case", "true", "predicted", "p", "image_share", "record_share",
                                          "central_mass")] for c in cases]
    summary = [[k.replace("_", " "), format_value(v)] for k, v in site.items()]
    parts = [
        f"<p>Checkpoint <code>{e(checkpoint.name)}</code>, model variant {e(cfg.model.variant)}, "
        "test split. Cases are numbered; no patient identifiers are shown. "
        "Central mass = share of Grad-CAM heat in the middle 50% × 50% of the image "
        "(0.25 for uniform heat). Shares come from masking each modality.</p>",
        "<h2>Site summary (whole test split)</h2>", table(["", "value"], summary),
        "<h2>Cases</h2>", table(head, rows),
        "<h2>Modality contribution</h2>" + image("contributions.png", "modality contribution"),
    ]
    for c in cases:
        parts.append(f"<h3>Case {c['case']}</h3>" + images((name, f"case {c['case']}") for name in c["images"]))
    return write_page(out / "explain.html", f"fedmed explain: {cfg.name} on {site_name}", parts)


# -- several sites --------------------------------------------------------------------------
_SUMMARY_COLS = (("test_samples", "test"), ("accuracy", "accuracy"),
                 ("central_mass_correct_n", "correct"), ("central_mass_correct_mean", "central mass"),
                 ("central_mass_correct_above_uniform", "> 0.25"),
                 ("central_mass_correct_above_half", "> 0.5"), ("mean_image_share", "image share"))
_PER_CORRECT_IMAGE = {"central_mass_correct_mean", "central_mass_correct_above_uniform",
                      "central_mass_correct_above_half"}


def summarise_sites(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several sites' ``site_summary`` → one row per site plus ``"all"``, weighted by count.

    Accuracy and image share are weighted by test samples; the central-mass figures by the
    correctly classified images they were measured on (so ``all`` is the figure over every
    correct image of every site, not a mean of site means).
    """
    rows: dict[str, Any] = dict(summaries)
    total: dict[str, Any] = {}
    for key, _ in _SUMMARY_COLS:
        weight = "central_mass_correct_n" if key in _PER_CORRECT_IMAGE else "test_samples"
        pairs = [(s[key], s.get(weight, 0)) for s in summaries.values()
                 if key in s and isinstance(s[key], (int, float)) and math.isfinite(s[key])]
        if key in ("test_samples", "central_mass_correct_n"):
            total[key] = int(sum(v for v, _ in pairs))
        elif pairs and sum(w for _, w in pairs) > 0:
            total[key] = float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs))
    rows["all"] = total
    return rows


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """:func:`summarise_sites`' rows as an aligned text table for the terminal."""
    cols = [(k, h) for k, h in _SUMMARY_COLS if any(k in r for r in rows.values())]
    width = max(len("site"), *(len(n) for n in rows))
    lines = [f"{'site':<{width}}" + "".join(f"{h:>14}" for _, h in cols)]
    lines.append("-" * len(lines[0]))
    lines += [f"{name:<{width}}" + "".join(f"{format_value(r.get(k)):>14}" for k, _ in cols)
              for name, r in rows.items()]
    return "\n".join(lines)
