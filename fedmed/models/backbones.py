"""Image backbones through one factory: fedmed's registered CNNs, else any timm model.

Every backbone has the same surface: ``num_features`` (channels / token width),
``output`` (``"map"`` → ``forward`` returns ``(B, C, h, w)``; ``"tokens"`` → ``(B, N, D)``)
and ``default_cfg`` (preprocessing defaults: input size, mean, std). Nothing is ever
downloaded: weights come only from a local file (``pretrained_path``).

``dp_compatible=True`` makes the network Opacus-ready: BatchNorm → GroupNorm (affine
parameters carried over) and every ``inplace`` flag off.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmed.errors import UsageError
from fedmed.models.pretrained import LoadReport, load_pretrained

__all__ = [
    "Backbone",
    "DEFAULT_CFGS",
    "SmallCNN",
    "backbone_stages",
    "create_backbone",
    "freeze_stages",
    "list_backbones",
    "make_dp_compatible",
    "register_backbone",
]

log = logging.getLogger(__name__)



class Backbone(nn.Module):
    """The surface every image backbone shows, whatever builds it (as timm's models share one).

    ``forward`` gives features, ``num_features`` their width, ``output`` "map" ``(B, C, h, w)``
    or "tokens" ``(B, L, C)``, ``default_cfg`` the preprocessing defaults (input size, mean,
    std, first conv); :func:`create_backbone` adds ``pretrained_report`` when it loads weights.
    """

    num_features: int
    output: str
    default_cfg: dict[str, Any]
    pretrained_report: LoadReport


_BACKBONES: dict[str, Callable[..., Backbone]] = {}

# timm.data's IMAGENET_DEFAULT_MEAN / _STD, written out: importing any part of timm loads all
# of it and torchvision (~2 s of CPU in every process), which a fedmed CNN never uses.
# tests/models/test_backbones.py checks they equal timm's.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

#: Preprocessing defaults per registered backbone (timm models use their pretrained_cfg).
DEFAULT_CFGS: dict[str, dict[str, Any]] = {
    # ImageNet statistics (timm's constants): centred, unit-scale inputs for a random-init
    # CNN; raw [0, 1] pixels (mean 0.0, std 1.0 before) kept it from learning HAM10000.
    "small_cnn": {"input_size": 64, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                  "first_conv": "blocks.0.0"},
}


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Register a backbone factory ``fn(*, in_chans) -> Backbone`` under ``fn.__name__``."""
    name = fn.__name__
    if name in _BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names registered with :func:`register_backbone` (any timm name works too)."""
    return sorted(_BACKBONES)


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class SmallCNN(Backbone):
    """Three [conv-GN-ReLU ×2, maxpool] blocks (w, 2w, 4w channels); DP-safe by design."""

    def __init__(self, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for c in (width, 2 * width, 4 * width):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, padding=1),
                    _group_norm(c, 8),
                    nn.ReLU(inplace=False),
                    nn.Conv2d(c, c, 3, padding=1),
                    _group_norm(c, 8),
                    nn.ReLU(inplace=False),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.num_features = 4 * width
        self.output = "map"
        self.default_cfg = dict(DEFAULT_CFGS["small_cnn"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Stages for freezing, as timm models define them: one per block."""
        return {"blocks": r"^blocks\.(\d+)"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → feature map ``(B, 4w, H/8, W/8)``."""
        return self.blocks(x)


@register_backbone
def small_cnn(*, in_chans: int, width: int = 32) -> SmallCNN:
    return SmallCNN(in_chans=in_chans, width=width)


class TimmBackbone(Backbone):
    """A headless timm model (``num_classes=0, global_pool=""``) behind the backbone surface.

    ``forward`` calls the model itself (so Opacus' module hooks fire) and returns its
    unpooled features; NHWC maps (Swin-like) come back as NCHW, ViT-like models give tokens.
    ``num_features`` / ``output`` are measured by :func:`create_backbone` with one probe pass.
    """

    def __init__(self, model: nn.Module, *, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        # timm's int; torch types every unregistered Module attribute as Tensor | Module
        self.num_features = int(model.num_features)  # type: ignore[arg-type]
        self._nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        self.default_cfg = {
            "input_size": int(size[-1]),
            "mean": cfg.get("mean", (0.485, 0.456, 0.406)),
            "std": cfg.get("std", (0.229, 0.224, 0.225)),
            "first_conv": cfg.get("first_conv"),
        }
        self.output = "map"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(x)
        if self._nhwc and f.ndim == 4:
            f = f.permute(0, 3, 1, 2)
        return f


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Module names of each stage, input to output, from timm's coarse ``group_matcher``
    (the grouping timm's layer-wise learning-rate decay uses: stem, blocks…, head).

    Raises ``ValueError`` when the network defines no ``group_matcher``.
    """
    from timm.models import group_modules

    root, prefix = (backbone.model, "model.") if isinstance(backbone, TimmBackbone) else (backbone, "")
    if not hasattr(root, "group_matcher"):
        raise UsageError(f"backbone {type(root).__name__} defines no group_matcher: it cannot be frozen "
                         "by stages; use model.trainable_stages=0 (all frozen) or null (none)")
    # a timm method (checked above); torch types unknown Module attributes as Tensor | Module
    groups = group_modules(root, root.group_matcher(coarse=True))  # type: ignore[operator]
    return [[prefix + n for n in groups[k]] for k in sorted(groups)]


def freeze_stages(backbone: nn.Module, *, trainable: int) -> int:
    """Freeze all but the last ``trainable`` stages with timm's ``freeze`` (parameters off,
    BatchNorm → FrozenBatchNorm2d so its statistics stay fixed in training); returns how many
    stages were frozen. ``trainable=0`` freezes the whole backbone.
    """
    from timm.utils import freeze

    if trainable == 0:
        freeze(backbone)
        return len(backbone_stages(backbone)) if _has_groups(backbone) else 1
    stages = backbone_stages(backbone)
    n_frozen = max(len(stages) - trainable, 0)
    names = [n for stage in stages[:n_frozen] for n in stage]
    if names:
        freeze(backbone, names)
    return n_frozen


def _has_groups(backbone: nn.Module) -> bool:
    return hasattr(backbone.model if isinstance(backbone, TimmBackbone) else backbone, "group_matcher")


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """BatchNorm → GroupNorm(gcd(32, C), C) keeping affine params; turn off ``inplace``.

    Works in place on ``model`` and returns it. timm's BatchNormAct keeps its activation.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _bn_to_gn(child))
        else:
            make_dp_compatible(child)
    for m in model.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
        _break_inplace_residual(m)
    return model


class _Clone(nn.Module):
    """Identity that returns a copy: a later in-place op then never hits a hooked output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _break_inplace_residual(block: nn.Module) -> None:
    """timm ResNet blocks do ``x += shortcut`` on the last norm's output.

    Opacus' backward hooks make that output a view that must not be modified in place,
    so the (unused) ``drop_path`` slot gets a parameter-free clone; state-dict keys stay.
    """
    resnet = sys.modules.get("timm.models.resnet")
    if resnet is None:  # no timm ResNet block can exist before timm's resnet module is loaded
        return  # (and a fedmed CNN then never loads timm at all)
    if isinstance(block, (resnet.BasicBlock, resnet.Bottleneck)) and block.se is None:
        if block.drop_path is None or isinstance(block.drop_path, nn.Identity):
            block.drop_path = _Clone()


def _bn_to_gn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    c = bn.num_features
    groups = math.gcd(32, c)
    gn: nn.GroupNorm
    act_like = hasattr(bn, "act") and hasattr(bn, "drop")
    if act_like:  # timm BatchNormAct2d: norm + drop + act in one module
        from timm.layers import GroupNormAct

        gn = GroupNormAct(c, num_groups=groups, eps=bn.eps, affine=bn.affine)
        act, drop = bn.act, bn.drop
        assert isinstance(act, nn.Module) and isinstance(drop, nn.Module)
        gn.act, gn.drop = act, drop
    else:
        gn = nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.to(device=bn.weight.device if bn.affine else None)


def _unknown(name: str) -> ValueError:
    import timm

    close = timm.list_models(f"*{name}*")[:8]
    hint = f" Close timm names: {', '.join(close)}." if close else ""
    return ValueError(
        f"unknown backbone {name!r}. Registered: {', '.join(list_backbones())}; "
        f"any timm model name also works (see timm.list_models()).{hint}"
    )


def create_backbone(
    name: str,
    *,
    in_chans: int,
    pretrained_path: str | Path | None = None,
    dp_compatible: bool = True,
    trainable_stages: int | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a headless backbone by name: registered names first, else timm (random init).

    ``pretrained_path``: a local weights file that must fill every backbone tensor, by name
    or, in another library's layout, by order (:func:`fedmed.models.pretrained.load_pretrained`;
    the input conv is adapted to ``in_chans``; what loaded is in ``model.pretrained_report``). Extra ``kwargs``
    go to the factory (e.g. ``img_size=64`` for a timm ViT). Raises ``ValueError`` for an
    unknown name, listing the registered ones. ``trainable_stages``: see :func:`freeze_stages`
    (None trains every stage).
    """
    if name in _BACKBONES:
        model = _BACKBONES[name](in_chans=in_chans, **kwargs)
        target: nn.Module = model  # the module whose weights a pretrained file fills
    else:
        import timm

        if not timm.is_model(name):
            raise _unknown(name)
        inner = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans, **kwargs
        )
        model = TimmBackbone(inner, name=name)
        if isinstance(kwargs.get("img_size"), int):
            model.default_cfg["input_size"] = kwargs["img_size"]
        target = inner
    if pretrained_path:
        model.pretrained_report = load_pretrained(
            target, pretrained_path, in_chans=in_chans, first_conv=model.default_cfg.get("first_conv"),
            classifier=getattr(target, "pretrained_cfg", {}).get("classifier"))
    if dp_compatible:
        make_dp_compatible(model)
    if trainable_stages is not None:
        n = freeze_stages(model, trainable=trainable_stages)
        log.info("%s: %d stage(s) frozen, the last %d trainable", name, n, trainable_stages)
    if isinstance(model, TimmBackbone):
        _probe(model, in_chans=in_chans)
    return model


def _probe(model: TimmBackbone, *, in_chans: int) -> None:
    """One forward/backward on a single zero image (64 px, else the model's input size).

    Sets ``output`` ("map" or "tokens") and ``num_features`` from the real output, and
    freezes parameters the forward never uses (e.g. a classifier-head norm): DP optimizers
    need a per-sample gradient for every trainable parameter.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        try:  # small and fast; fixed-size models (ViT, Swin) reject it
            f = model(torch.zeros(1, in_chans, 64, 64))
        except Exception:  # noqa: BLE001 - retry at the size the model was built for
            size = model.default_cfg["input_size"]
            f = model(torch.zeros(1, in_chans, size, size))
        grads = (torch.autograd.grad(f.float().mean(), params, allow_unused=True) if params
                 else [])  # a frozen backbone has nothing to check
    finally:
        model.train(was_training)
    model.output = "tokens" if f.ndim == 3 else "map"
    model.num_features = int(f.shape[-1] if f.ndim == 3 else f.shape[1])
    unused = [p for p, g in zip(params, grads, strict=True) if g is None]
    for p in unused:
        p.requires_grad_(False)
    if unused:
        log.info("%s: froze %d parameters its forward does not use", model.name, len(unused))
