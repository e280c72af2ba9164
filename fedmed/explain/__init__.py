"""Explanations clinicians can look at: Grad-CAM, record attention, modality contribution.

Methods and reporting are apart, as in MONAI's ``visualize/``: :mod:`.gradcam` (image
heat maps) and :mod:`.attribution` (record fields, modalities) compute arrays from a model
and a batch; :mod:`.report` runs them over a site's test split and writes figures and a
page (``fedmed explain``). Works on any fedmed checkpoint — a local ``model.pt`` or a
federation's ``best_model.pt`` / ``last_model.pt`` — because both carry their config.
"""

from fedmed.explain.attribution import modality_contribution, record_attention
from fedmed.explain.gradcam import attention_rollout, central_mass, grad_cam
from fedmed.explain.report import explain, summarise_sites

__all__ = ["grad_cam", "attention_rollout", "central_mass", "record_attention", "modality_contribution",
           "explain", "summarise_sites"]
