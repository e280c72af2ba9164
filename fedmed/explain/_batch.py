"""A batch of sample dicts as a fedmed model's keyword inputs, on the model's device."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["device_of", "model_inputs"]


def device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = device_of(model)
    return {k: v.to(dev) for k, v in batch.items() if k not in ("label", "meta")}

