"""Device selection and mixed precision: use the GPU wherever a site has one."""

from __future__ import annotations

import contextlib

import torch

from fedmed.errors import RunError

__all__ = ["select_device", "autocast", "amp_enabled"]


def select_device(preference: str = "auto") -> torch.device:
    """Return ``cuda`` if present, else ``mps``, else ``cpu`` (or the one asked for).

    Raises ``RuntimeError`` when an explicitly requested accelerator is not available,
    rather than silently training on the CPU.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(preference)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {preference!r} requested but CUDA is not available; use device=auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"device {preference!r} requested but MPS is not available; use device=auto")
    return dev


def amp_enabled(device: torch.device, requested: bool = True) -> bool:
    """AMP only on CUDA: CPU autocast slows small models down and changes numerics."""
    return bool(requested and device.type == "cuda")


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed-precision context (bf16 where supported, else fp16) or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
