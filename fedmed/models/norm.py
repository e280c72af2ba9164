"""Which weights stay at a site: BatchNorm kept local per site (FedBN) or averaged.

FedBN (Li et al., ICLR 2021) keeps every BatchNorm layer's affine weights and running
statistics at the site: each hospital's scanner or camera shifts feature statistics, and
averaging them blurs all sites. One function answers "which state-dict keys are local", so
the site (what it keeps and never uploads), the server (what it never averages) and any
personalisation built on top agree.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

__all__ = ["BN_MODES", "BnMode", "local_keys"]

BnMode = Literal["average", "local"]
BN_MODES: tuple[str, ...] = ("average", "local")


def local_keys(model: nn.Module, mode: str) -> list[str]:
    """State-dict keys a site keeps to itself under ``federation.bn = mode``.

    ``"average"``: none. ``"local"``: every parameter and buffer of every trainable-statistics
    BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``);
    frozen ones (timm's FrozenBatchNorm2d) never change, so they stay shared. Raises
    ``ValueError`` for an unknown mode.
    """
    if mode not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {mode!r}; choose one of {', '.join(BN_MODES)}")
    if mode == "average":
        return []
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in module.state_dict()]
    return keys
