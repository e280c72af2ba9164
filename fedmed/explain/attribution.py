"""Record-branch and modality attributions: record-field attention, masking each modality."""

from __future__ import annotations

import numpy as np
import torch

from fedmed.explain._batch import device_of, model_inputs
from fedmed.models.fusion import FusionModel

__all__ = ["record_attention", "modality_contribution"]


@torch.no_grad()
def record_attention(model: FusionModel, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Record branch: the last layer's CLS → feature attention, ``(B, F)``, rows sum to 1.

    Head-averaged and renormalised over the ``F`` record features (CLS→CLS and notes tokens
    left out), in the config's order: numeric, then categorical. Rows of samples without a
    record are NaN. Raises ``RuntimeError`` for an image-only model.
    """
    model.eval()
    inputs = model_inputs(model, batch)
    model(**inputs)
    w = model.record_attention().float()
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    out = w.cpu().numpy().astype(np.float64)
    if "has_record" in inputs:
        out[inputs["has_record"].cpu().numpy() == 0] = np.nan
    return out


@torch.no_grad()
def modality_contribution(model: FusionModel, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """How much each prediction relied on the image and on the record (masking test).

    Per sample, for the class predicted with both modalities: ``p_full``, ``p_no_image``
    (``has_image`` = 0, the model's learned "missing" embedding instead), ``p_no_record``;
    ``contribution_* = p_full - p_no_*`` (signed: negative means the modality argued
    against the prediction) and ``share_* = |contribution_*| / (|c_image| + |c_record|)``
    (NaN where neither matters). A modality the model does not use contributes 0.
    """
    model.eval()
    inputs = model_inputs(model, batch)
    b = next(iter(inputs.values())).shape[0]
    ones = torch.ones(b, device=device_of(model))

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

