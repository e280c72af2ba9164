"""Load a local weights file into a backbone: by name, or by order when the layout differs.

Hospitals keep ImageNet (or their own) weights on disk, often saved by another library
(EfficientNet-PyTorch's ``_conv_stem.weight`` for timm's ``conv_stem.weight``). The file is
read with timm's :func:`timm.models.load_state_dict` (``.pth``/``.pt``/``.bin``/
``.safetensors``, checkpoint dicts, ``module.`` prefix) and mapped onto the model:

1. **names** – every backbone tensor is in the file under its own name (optionally under a
   common prefix, e.g. a fedmed ``model.pt``'s ``image_branch.backbone.model.``);
2. **order** – no name fits, but the file holds the same architecture: its tensors, in
   order, have the model's shapes and kinds (``weight``/``bias``/``running_mean``/…).

Anything else is refused with a :class:`WeightsMismatch` that names the first tensor that
does not fit. Tensors the backbone lacks (the 1000-class head) are skipped and reported.
The input conv is adapted to ``in_chans`` with timm's :func:`adapt_input_conv`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedmed.errors import FedmedError, UsageError

__all__ = ["LoadReport", "WeightsMismatch", "load_pretrained", "read_state_dict"]

log = logging.getLogger(__name__)


class WeightsMismatch(FedmedError, ValueError):
    """The weights file does not fit the configured backbone; the message names the tensor."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did (also logged at INFO)."""

    path: str
    mode: str  # "names" | "order"
    loaded: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file key, reason)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"loaded {self.loaded} tensors from {Path(self.path).name} (matched by {self.mode})"
        if self.adapted:
            s += f"; input conv adapted: {', '.join(self.adapted)}"
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for key, why in self.skipped:
                reasons.setdefault(why, []).append(key)
            s += "; skipped " + "; ".join(f"{len(v)} ({why}): {', '.join(v[:4])}" + (" …" if len(v) > 4 else "")
                                          for why, v in reasons.items())
        return s


def _tensors(sd: dict) -> dict[str, torch.Tensor]:
    """Tensors that carry weights: ``num_batches_tracked`` counters differ between libraries."""
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a local file (timm's reader: EMA / ``state_dict`` / ``model``
    entries unwrapped, ``module.`` stripped); ``FileNotFoundError`` / ``ValueError`` otherwise."""
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        sd = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise UsageError(f"cannot read weights from {path}: {exc}") from exc
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} does not hold a state dict of tensors")
    return sd


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _with_prefix(own: dict[str, torch.Tensor], file: dict[str, torch.Tensor]) -> str | None:
    """The prefix under which every model key is in the file ('' = plain names), else None."""
    first = next(iter(own))
    for cand in [k[: -len(first)] for k in file if k.endswith(first)]:
        if cand and not cand.endswith("."):
            continue
        if all(cand + k in file for k in own):
            return cand
    return None


def _fit_input_conv(key: str, src: torch.Tensor, dst: torch.Tensor, *, first_conv: str | None,
                    in_chans: int) -> torch.Tensor | None:
    """``src`` adapted to ``dst``'s input channels when ``key`` is the input conv, else None."""
    from timm.models import adapt_input_conv

    is_first = first_conv is not None and key == f"{first_conv}.weight"
    if is_first and src.ndim == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        return adapt_input_conv(in_chans, src)
    return None


def _head_reason(key: str, classifier: str | None) -> str:
    if classifier and (key == classifier or key.startswith(classifier + ".")):
        return "classifier head: fedmed builds its own for the task's classes"
    return "not in the headless backbone"


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    in_chans: int,
    first_conv: str | None = None,
    classifier: str | None = None,
) -> LoadReport:
    """Fill every tensor of ``model`` from ``path`` (names, else order) or raise.

    ``first_conv`` (module name) is adapted to ``in_chans`` when its input channels differ;
    ``classifier`` names the head the file may carry (skipped, reported). Raises
    :class:`WeightsMismatch` naming the first tensor that does not fit, ``FileNotFoundError``
    for a missing file.
    """
    file = _tensors(read_state_dict(path))
    own = _tensors(model.state_dict())
    prefix = _with_prefix(own, file)
    mapped: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    if prefix is not None:
        mode, pairs = "names", [(k, prefix + k) for k in own]
        used = {prefix + k for k in own}
        skipped = [(k, _head_reason(k[len(prefix):] if k.startswith(prefix) else k, classifier))
                   for k in file if k not in used]
    else:
        mode = "order"
        fkeys = list(file)
        pairs = list(zip(own, fkeys, strict=False))
        skipped = [(k, "after the backbone's last tensor: the classifier head") for k in fkeys[len(own):]]
    for mk, fk in pairs:
        src, dst = file[fk], own[mk]
        if _shape(src) != _shape(dst) or (mode == "order" and _kind(mk) != _kind(fk)):
            fitted = _fit_input_conv(mk, src, dst, first_conv=first_conv, in_chans=in_chans)
            if fitted is None or _shape(fitted) != _shape(dst) or _kind(mk) != _kind(fk):
                how = "named as" if mode == "names" else f"tensor #{len(mapped) + 1} in order, for"
                raise WeightsMismatch(
                    f"{path}: tensor {fk!r} {list(src.shape)} does not fit the backbone's {mk!r} "
                    f"{list(dst.shape)} ({how} it); is the file for another architecture than "
                    f"the configured backbone?")
            src = fitted
            adapted.append(mk)
        mapped[mk] = src.to(dst.dtype)
    if len(mapped) < len(own):
        raise WeightsMismatch(
            f"{path}: no backbone tensor is named as in the file, and the file has only {len(file)} "
            f"tensors for the backbone's {len(own)} (the first without a counterpart is "
            f"{list(own)[len(mapped)]!r}): it is not a state dict for this architecture")
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # cannot happen with the mapping above; guard the invariant
        raise WeightsMismatch(f"{path}: could not load {missing[:3] or unexpected[:3]}")
    report = LoadReport(path=str(path), mode=mode, loaded=len(mapped), skipped=skipped, adapted=adapted)
    log.info("pretrained backbone: %s", report.summary())
    return report
