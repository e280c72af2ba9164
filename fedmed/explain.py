"""Explanations clinicians can look at: Grad-CAM, record attention, modality contribution.

Works on any fedmed checkpoint — a local ``model.pt`` or a federation's ``best_model.pt`` /
``last_model.pt`` — because both carry the config the model was built from. ``fedmed
explain`` writes, for a site's test split, one PNG per case (image + Grad-CAM overlay), one
bar chart of record-field attention per case, a modality-contribution chart and an HTML
page. Nothing written carries a patient id or an image file name: cases are numbered.

Grad-CAM (Selvaraju et al. 2017) is hand-rolled on forward/backward hooks (~20 lines):
``pytorch-grad-cam`` is not a dependency and would not know the fusion model's dict inputs.
Figures use matplotlib's object API (``Figure``), as ``server/report.py`` does.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedmed.checkpoint import load_checkpoint as read_checkpoint
from fedmed.config import FedmedConfig

__all__ = [
    "load_checkpoint",
    "grad_cam",
    "attention_rollout",
    "record_attention",
    "modality_contribution",
    "central_mass",
    "site_split",
    "explain",
    "summarise_sites",
    "add_cli",
]


# -- checkpoints and data -------------------------------------------------------------
def load_checkpoint(
    path: str | Path, *, config_path: str | Path | None = None
) -> tuple[nn.Module, FedmedConfig]:
    """A local (``model.pt``) or federated (``best_model.pt``) checkpoint → ``(model, config)``.

    Read by :func:`fedmed.checkpoint.load_checkpoint` (the one reader of model files); the
    model is in eval mode on the CPU. Raises ``ValueError`` when the file has no config and
    none is given, or when the weights do not fit the config's model.
    """
    ckpt = read_checkpoint(path, config_path=config_path)
    return ckpt.build_model(), ckpt.config


def _trained_pooled(checkpoint: Path) -> bool:
    """True when ``metrics.json`` beside a local checkpoint says it was trained pooled."""
    meta = checkpoint.parent / "metrics.json"
    try:
        return json.loads(meta.read_text()).get("site") == "pooled"
    except (OSError, ValueError):
        return False


def site_split(
    cfg: FedmedConfig,
    site_dir: str | Path | None,
    *,
    split: str | tuple[str, ...] = "test",
    pooled: bool = False,
    encoder_state: dict[str, Any] | None = None,
) -> Any:
    """A split of a site (or a dict of several), as the model was evaluated on it.

    ``pooled=False``: the site folder split on its own (what a federation and a one-site
    local run use). ``pooled=True``: the model was trained on the config's sites pooled, so
    the pooled split is rebuilt and only this site's samples are kept — otherwise training
    patients would leak into the "test" split. ``encoder_state`` (a local checkpoint's
    ``"encoder"``) replaces the encoder refitted here, so record features are scaled exactly
    as in training. ``site_dir=None`` → the whole pool of the config's sites (pooled split).
    ``split`` a tuple → ``{name: Dataset}`` from one load.
    """
    from fedmed.data.dataset import SiteDataset
    from fedmed.data.records import RecordEncoder
    from fedmed.task import load_site_bundle

    pooled = pooled or site_dir is None
    site_dir = Path(site_dir) if site_dir is not None else None
    if pooled:
        bundle = load_site_bundle(cfg, progress=False)
        sites = sorted(bundle.site.samples["site"].unique())
        if site_dir is not None and site_dir.name not in sites:
            raise ValueError(f"site {site_dir.name!r} is not one of the pooled sites {sites}")
    else:
        bundle = load_site_bundle(cfg, site_dir=site_dir, progress=False)
    encoder = None
    if encoder_state is not None and not cfg.model.notes.enabled:
        encoder = RecordEncoder(numeric=cfg.data.numeric, categorical=cfg.data.categorical,
                                imputation=cfg.data.imputation)
        encoder.load_state_dict(encoder_state)
    out: dict[str, Dataset] = {}
    for name in (split,) if isinstance(split, str) else split:
        rows = bundle.site.samples.iloc[bundle.splits.indices[name]]
        keep = (np.flatnonzero(rows["site"].to_numpy() == site_dir.name)
                if pooled and site_dir is not None else np.arange(len(rows)))
        base: SiteDataset = getattr(bundle.splits, name)
        if encoder is not None:
            out[name] = SiteDataset(rows.iloc[keep], bundle.site.records, encoder=encoder,
                                    spec=base.spec, cache=base.cache)
        else:
            out[name] = base if len(keep) == len(rows) else torch.utils.data.Subset(base, keep.tolist())
    return out[split] if isinstance(split, str) else out


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = _device(model)
    return {k: v.to(dev) for k, v in batch.items() if k not in ("label", "meta")}


# -- image branch -------------------------------------------------------------------------
def _prefix_tokens(target: nn.Module, n: int) -> int:
    """Leading non-patch tokens (CLS, registers) of a token-output backbone."""
    inner = getattr(target, "model", target)
    k = getattr(inner, "num_prefix_tokens", None)
    if isinstance(k, int):
        return k
    return n - int(math.isqrt(n)) ** 2


def _token_grid(x: torch.Tensor, prefix: int) -> torch.Tensor:
    """``(B, N)`` token scores → ``(B, g, g)`` patch grid (prefix tokens dropped)."""
    x = x[:, prefix:]
    g = int(math.isqrt(x.shape[1]))
    if g * g != x.shape[1]:
        raise ValueError(f"cannot arrange {x.shape[1]} image tokens on a square grid")
    return x.reshape(x.shape[0], g, g)


def _upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(B, h, w)`` ≥ 0 → ``(B, H, W)`` in [0, 1], each map divided by its maximum."""
    cam = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    cam = cam.clamp_min(0)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).detach().cpu().numpy()


def grad_cam(
    model: nn.Module, batch: dict[str, torch.Tensor], *, target: int | None = None
) -> np.ndarray:
    """Grad-CAM of the image branch: ``(B, H, W)`` in [0, 1] at the input image's size.

    ``target``: class to explain (default: each sample's predicted class). Feature maps get
    the standard weights (mean gradient per channel, ReLU of the weighted sum); a
    token-output backbone (ViT-like) gets the same on tokens (mean gradient per embedding
    dimension) arranged on the patch grid. Samples without an image get an all-zero map.
    Raises ``RuntimeError`` for a record-only model.
    """
    layer = model.gradcam_target()
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = _inputs(model, batch)
            # a graph to the feature map even when the backbone's weights are frozen
            inputs["image"] = inputs["image"].detach().float().requires_grad_(True)
            logits = model(**inputs).float()
            cls = logits.argmax(dim=1) if target is None else torch.full_like(
                logits[:, 0], int(target), dtype=torch.long)
            act = store["act"]
            score = logits.gather(1, cls[:, None]).sum()
            (grads,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    act, grads = act.detach().float(), grads.float()
    if act.ndim == 4:  # (B, C, h, w)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(dim=1))
    elif act.ndim == 3:  # (B, N, D) tokens
        weights = grads.mean(dim=1, keepdim=True)
        cam = _token_grid(F.relu((weights * act).sum(dim=-1)), _prefix_tokens(layer, act.shape[1]))
    else:
        raise RuntimeError(f"Grad-CAM needs a feature map or tokens, got shape {tuple(act.shape)}")
    if "has_image" in inputs:
        cam = cam * inputs["has_image"].reshape(-1, 1, 1).to(cam.dtype)
    return _upsample(cam, tuple(inputs["image"].shape[-2:]))


def attention_rollout(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) for a transformer image backbone.

    Head-averaged attention plus identity, row-normalised, multiplied over layers; the map
    is the CLS row (or the mean row without a CLS token) over the patch tokens, ``(B, H, W)``
    in [0, 1]. Works with timm attention modules (their fused kernel is switched off for the
    call). Raises ``RuntimeError`` when the backbone has no attention layers.
    """
    layer = model.gradcam_target()
    attn_mods = [m for m in layer.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
    if not attn_mods:
        raise RuntimeError("the image backbone has no attention layers: use grad_cam")
    maps: list[torch.Tensor] = []
    hooks = [m.attn_drop.register_forward_hook(lambda _m, inp, _o: maps.append(inp[0].detach()))
             for m in attn_mods]
    fused = [m.fused_attn for m in attn_mods]
    for m in attn_mods:
        m.fused_attn = False
    try:
        with torch.no_grad():
            inputs = _inputs(model, batch)
            model.eval()(**inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, f in zip(attn_mods, fused):
            m.fused_attn = f
    roll = None
    for a in maps:
        a = a.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        roll = a if roll is None else a @ roll
    prefix = _prefix_tokens(layer, roll.shape[-1])
    row = roll[:, 0] if prefix else roll.mean(dim=1)
    cam = _token_grid(row, prefix)
    if "has_image" in inputs:
        cam = cam * inputs["has_image"].reshape(-1, 1, 1).to(cam.dtype)
    return _upsample(cam, tuple(inputs["image"].shape[-2:]))


def central_mass(cam: np.ndarray, frac: float = 0.5) -> float:
    """Share of heat inside the central box covering ``frac`` of each side.

    ``cam`` is ``(H, W)`` (one map) or ``(B, H, W)`` (the mean share over maps with any
    heat). A uniform map scores ``frac**2`` (0.25 by default). NaN when there is no heat.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim == 3:
        shares = [central_mass(c, frac) for c in cam]
        shares = [s for s in shares if math.isfinite(s)]
        return float(np.mean(shares)) if shares else float("nan")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    h, w = cam.shape
    bh, bw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = (h - bh) // 2, (w - bw) // 2
    total = cam.sum()
    if total <= 0:
        return float("nan")
    return float(cam[top:top + bh, left:left + bw].sum() / total)


# -- record branch and modalities ----------------------------------------------------------
@torch.no_grad()
def record_attention(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Record branch: the last layer's CLS → feature attention, ``(B, F)``, rows sum to 1.

    Head-averaged and renormalised over the ``F`` record features (CLS→CLS and notes tokens
    left out), in the config's order: numeric, then categorical. Rows of samples without a
    record are NaN. Raises ``RuntimeError`` for an image-only model.
    """
    model.eval()
    inputs = _inputs(model, batch)
    model(**inputs)
    w = model.record_attention().float()
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    out = w.cpu().numpy().astype(np.float64)
    if "has_record" in inputs:
        out[inputs["has_record"].cpu().numpy() == 0] = np.nan
    return out


@torch.no_grad()
def modality_contribution(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """How much each prediction relied on the image and on the record (masking test).

    Per sample, for the class predicted with both modalities: ``p_full``, ``p_no_image``
    (``has_image`` = 0, the model's learned "missing" embedding instead), ``p_no_record``;
    ``contribution_* = p_full - p_no_*`` (signed: negative means the modality argued
    against the prediction) and ``share_* = |contribution_*| / (|c_image| + |c_record|)``
    (NaN where neither matters). A modality the model does not use contributes 0.
    """
    model.eval()
    inputs = _inputs(model, batch)
    b = next(iter(inputs.values())).shape[0]
    ones = torch.ones(b, device=_device(model))

    def probs(**masks: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(**{**inputs, **masks}).float(), dim=1)

    full = probs()
    pred = full.argmax(dim=1, keepdim=True)
    no_img = probs(has_image=0 * ones)
    no_rec = probs(has_record=0 * ones)
    p_full, p_ni, p_nr = (p.gather(1, pred)[:, 0].cpu().numpy().astype(np.float64)
                          for p in (full, no_img, no_rec))
    c_img, c_rec = p_full - p_ni, p_full - p_nr
    total = np.abs(c_img) + np.abs(c_rec)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_img = np.where(total > 1e-9, np.abs(c_img) / total, np.nan)
    return {
        "pred": pred[:, 0].cpu().numpy(),
        "p_full": p_full, "p_no_image": p_ni, "p_no_record": p_nr,
        "contribution_image": c_img, "contribution_record": c_rec,
        "share_image": share_img, "share_record": 1.0 - share_img,
    }


# -- figures --------------------------------------------------------------------------------
def _to_display(image: torch.Tensor) -> np.ndarray:
    img = image.detach().cpu().float().numpy()
    return img[0] if img.shape[0] == 1 else np.clip(img.transpose(1, 2, 0), 0, 1)


def _case_png(path: Path, image: torch.Tensor, cam: np.ndarray | None, title: str) -> Path:
    disp = _to_display(image)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# -- explain --------------------------------------------------------------------------------
def _feature_labels(cfg: FedmedConfig, cat_row: np.ndarray) -> list[str]:
    names = list(cfg.data.numeric)
    for (col, vocab), idx in zip(cfg.data.categorical.items(), cat_row):
        value = vocab[int(idx) - 1] if 0 < int(idx) <= len(vocab) else "missing"
        names.append(f"{col} = {value}")
    return names


def _run_all(model: nn.Module, data: Dataset, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Predictions, contributions and (image models) Grad-CAM central mass for a whole split."""
    keys: dict[str, list[np.ndarray]] = {}
    has_image_branch = getattr(model, "image_branch", None) is not None
    for batch in DataLoader(data, batch_size=batch_size):
        res = modality_contribution(model, batch)
        with torch.no_grad():
            probs = torch.softmax(model(**_inputs(model, batch)).float(), dim=1).cpu().numpy()
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
        raise ValueError(f"test-sample positions {bad} out of range (the split has {n})")
    return [int(i) for i in patients]


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}.case{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}"""


def _fmt(v: Any) -> str:
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
    the pooled split, see :func:`site_split`.
    """
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint, config_path=config_path)
    model, cfg = ckpt.build_model(), ckpt.config
    if cfg.model.multilabel:
        raise ValueError("fedmed explain supports single-label (softmax) models only")
    pooled = _trained_pooled(checkpoint) if pooled is None else pooled
    data = site_split(cfg, site_dir, split="test", pooled=pooled, encoder_state=ckpt.encoder)
    if len(data) == 0:
        raise ValueError(f"the test split of {site_dir} is empty")
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
                                               map(float, w)))
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
    e = html.escape
    title = f"fedmed explain: {cfg.name} on {site_name}"
    head = ["case", "true", "predicted", "p", "image share", "record share", "central mass"]
    rows = "".join("<tr>" + "".join(f"<td>{e(_fmt(c[k]))}</td>" for k in (
        "case", "true", "predicted", "p", "image_share", "record_share", "central_mass")) + "</tr>"
        for c in cases)
    summary = "".join(f"<tr><td>{e(k.replace('_', ' '))}</td><td>{e(_fmt(v))}</td></tr>"
                      for k, v in site.items())
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
        f"<p>Checkpoint <code>{e(checkpoint.name)}</code>, model variant {e(cfg.model.variant)}, "
        "test split. Cases are numbered; no patient identifiers are shown. "
        "Central mass = share of Grad-CAM heat in the middle 50% × 50% of the image "
        "(0.25 for uniform heat). Shares come from masking each modality.</p>",
        "<h2>Site summary (whole test split)</h2>",
        f"<table><thead><tr><th></th><th>value</th></tr></thead><tbody>{summary}</tbody></table>",
        "<h2>Cases</h2><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{rows}</tbody></table>",
        "<h2>Modality contribution</h2><img src='contributions.png' alt='modality contribution'>",
    ]
    for c in cases:
        imgs = "".join(f"<img src='{e(name)}' alt='case {c['case']}'>" for name in c["images"])
        parts.append(f"<h3>Case {c['case']}</h3><div class='case'>{imgs}</div>")
    parts.append("</body></html>")
    path = out / "explain.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# -- CLI ------------------------------------------------------------------------------------
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


def _summary_table(rows: dict[str, dict[str, Any]]) -> str:
    cols = [(k, h) for k, h in _SUMMARY_COLS if any(k in r for r in rows.values())]
    width = max(len("site"), *(len(n) for n in rows))
    lines = [f"{'site':<{width}}" + "".join(f"{h:>14}" for _, h in cols)]
    lines.append("-" * len(lines[0]))
    lines += [f"{name:<{width}}" + "".join(f"{_fmt(r.get(k)):>14}" for k, _ in cols)
              for name, r in rows.items()]
    return "\n".join(lines)


def _cmd_explain(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    site_dirs = [Path(d) for d in args.site_dir]
    names = [d.name for d in site_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"--site-dir names a site twice: {names}")
    base = Path(args.out) if args.out else ckpt.parent
    summaries: dict[str, dict[str, Any]] = {}
    for site_dir in site_dirs:
        out = (base / f"explain-{site_dir.name}") if (len(site_dirs) > 1 or not args.out) else base
        path = explain(ckpt, site_dir=site_dir, out_dir=out, config_path=args.config,
                       patients=args.patients, errors=args.errors, pooled=args.pooled)
        summaries[site_dir.name] = json.loads((out / "explain.json").read_text())["site_summary"]
        print(f"wrote {path}")
    if len(site_dirs) == 1:
        for k, v in summaries[names[0]].items():
            print(f"{k:40s} {_fmt(v)}")
        return 0
    rows = summarise_sites(summaries)
    (base / "explain-summary.json").write_text(json.dumps(rows, indent=2, default=float))
    print("\n" + _summary_table(rows))
    print("\ncentral mass: share of Grad-CAM heat in the middle 50% x 50% (0.25 = uniform), "
          "over correctly classified test images")
    print(f"wrote {base / 'explain-summary.json'}")
    return 0


def add_cli(subparsers: Any) -> None:
    """``fedmed explain CHECKPOINT --site-dir DIR [--site-dir DIR ...] [--patients N] [--errors N]``."""
    p = subparsers.add_parser("explain", help="Grad-CAM, record attention and modality shares for a site")
    p.add_argument("checkpoint", help="model.pt (local) or best_model.pt / last_model.pt (federated)")
    p.add_argument("--site-dir", required=True, action="append",
                   help="a site folder whose test split to explain (repeat for several sites: "
                        "one folder each and a summary table over all)")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the checkpoint's own)")
    p.add_argument("--patients", type=int, default=8, help="explain the first N test samples")
    p.add_argument("--errors", type=int, default=0, help="explain the N most confident errors instead")
    p.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=None,
                   help="the model was trained on the config's sites pooled (default: from metrics.json)")
    p.add_argument("--out", help="output folder (default: explain-<site> beside the checkpoint; "
                                 "with several sites, the folder that holds them)")
    p.set_defaults(func=_cmd_explain)
