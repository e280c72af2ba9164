"""Image-branch heat maps: Grad-CAM, attention rollout, and how central the heat is.

Grad-CAM (Selvaraju et al. 2017) is hand-rolled on forward/backward hooks (~20 lines):
``pytorch-grad-cam`` is not a dependency and would not know the fusion model's dict inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed.explain._batch import model_inputs
from fedmed.models.fusion import FusionModel

__all__ = ["grad_cam", "attention_rollout", "central_mass"]


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


def _image_size(inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    h, w = inputs["image"].shape[-2:]
    return int(h), int(w)


def _upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(B, h, w)`` ≥ 0 → ``(B, H, W)`` in [0, 1], each map divided by its maximum."""
    cam = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    cam = cam.clamp_min(0)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).detach().cpu().numpy()


def grad_cam(
    model: FusionModel, batch: dict[str, torch.Tensor], *, target: int | None = None
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
            inputs = model_inputs(model, batch)
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
    return _upsample(cam, _image_size(inputs))


def attention_rollout(model: FusionModel, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) for a transformer image backbone.

    Head-averaged attention plus identity, row-normalised, multiplied over layers; the map
    is the CLS row (or the mean row without a CLS token) over the patch tokens, ``(B, H, W)``
    in [0, 1]. Works with timm attention modules (their fused kernel is switched off for the
    call). Raises ``RuntimeError`` when the backbone has no attention layers.
    """
    layer = model.gradcam_target()
    # timm attention modules, found by the attributes this function switches (duck-typed)
    attn_mods: list[Any] = [m for m in layer.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
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
            inputs = model_inputs(model, batch)
            model.eval()(**inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, f in zip(attn_mods, fused, strict=True):
            m.fused_attn = f
    roll = None
    for a in maps:
        a = a.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        roll = a if roll is None else a @ roll
    assert roll is not None  # a map per attention layer, and there is at least one
    prefix = _prefix_tokens(layer, roll.shape[-1])
    row = roll[:, 0] if prefix else roll.mean(dim=1)
    cam = _token_grid(row, prefix)
    if "has_image" in inputs:
        cam = cam * inputs["has_image"].reshape(-1, 1, 1).to(cam.dtype)
    return _upsample(cam, _image_size(inputs))


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

