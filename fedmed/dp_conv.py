"""Faster per-sample gradients for ``nn.Conv2d`` under Opacus, with Opacus' numbers.

Why: on the fusion model most of DP-SGD's extra step time was the convolutions' per-sample
weight gradients. Two cuts, both for ``nn.Conv2d`` only, both leaving clipping, noise,
sampling and accounting to Opacus:

1. :func:`conv2d_grad_sample`, registered as Opacus' ``nn.Conv2d`` grad sampler, computes
   every sample's weight gradient in **one grouped convolution-backward call** (the batch
   folded into the channels, ``groups = batch × groups``: sample ``b``'s activations only
   meet sample ``b``'s output gradient), which is the same oneDNN kernel that computes the
   plain batch weight gradient. Opacus' own sampler materialises the im2col ("unfold") of
   every activation, ``B × C·k² × H·W`` floats, before one batched matmul; on CPU at batch 32
   the grouped call is 2-6× faster and about as fast as the plain weight gradient.
2. :func:`skip_batch_param_grads`: autograd would still compute each convolution's
   batch-summed weight and bias gradient, which the DP optimizer then overwrites with the
   noised sum of the clipped per-sample gradients. With it, a wrapped ``nn.Conv2d`` asks its
   backward for the input gradient only (:class:`_InputGradOnly`); ``p.grad`` of its weight
   and bias stays ``None`` after ``backward()`` and is set by ``DPOptimizer`` from
   ``p.grad_sample`` as before. It applies only while Opacus' hooks are live (the module is
   in training, gradients are on, the GradSampleModule's hooks are enabled); otherwise the
   layer runs as plain ``nn.Conv2d``.

Layers the grouped call does not cover (non-zero padding modes, ``padding="same"``, empty
batches) go to Opacus' own sampler; ``tests/client/test_privacy.py`` checks both agree on
every layer shape the fusion and pretrained models use and that a whole DP step gives the
same update as Opacus alone. :func:`use_fast_conv2d` switches the sampler back.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.nn import grad as nn_grad

__all__ = [
    "conv2d_grad_sample",
    "fast_conv2d_enabled",
    "group_norm_grad_sample",
    "skip_batch_param_grads",
    "skips_batch_param_grads",
    "use_fast_conv2d",
]


def _covered(layer: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        type(layer) is nn.Conv2d
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and x.dim() == 4
        and x.shape[0] > 0
    )


def _weight_grad_sample(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    n, (o, i) = x.shape[0], layer.weight.shape[:2]
    padding = layer.padding
    assert not isinstance(padding, str)  # _covered() leaves "same"/"valid" to Opacus
    if (tuple(layer.kernel_size) == (1, 1) and layer.groups == 1 and tuple(padding) == (0, 0)
            and tuple(layer.stride) == (1, 1)):  # 1×1: one matrix product per sample (faster than grouped)
        return torch.bmm(backprops.reshape(n, o, -1), x.reshape(n, i, -1).transpose(1, 2)).view(n, o, i, 1, 1)
    # one convolution per sample, as groups of one batch-1 convolution: the channels of
    # sample b (and of its group g) form group b·groups + g
    gw = nn_grad.conv2d_weight(
        x.reshape(1, n * x.shape[1], *x.shape[2:]),
        (n * o, i, *layer.kernel_size),
        backprops.reshape(1, n * o, *backprops.shape[2:]),
        stride=layer.stride, padding=padding, dilation=layer.dilation, groups=n * layer.groups,
    )
    return gw.view(n, o, i, *layer.kernel_size)


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample ``{weight: (B, O, I/groups, kh, kw), bias: (B, O)}`` (Opacus' grad-sampler contract)."""
    x = activations[0]
    if not _covered(layer, x):
        return compute_conv_grad_sample(layer, activations, backprops)
    ret: dict[torch.Tensor, torch.Tensor] = {}  # keyed by the layer's parameters
    if layer.weight.requires_grad:
        # The grouped weight-gradient kernel is 3-6x slower on NHWC (channels_last) maps than
        # on NCHW ones, and one NCHW copy of each costs far less than that difference.
        x, g = x.contiguous(), backprops.contiguous()
        ret[layer.weight] = _weight_grad_sample(layer, x.to(g.dtype), g)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


#: GroupNorm per-sample gradients are computed this many activation floats at a time (the
#: normalised chunk stays in cache instead of being a fresh ``B × C × H × W`` tensor).
GN_CHUNK = 1 << 17


def group_norm_grad_sample(
    layer: nn.GroupNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample ``{weight: (B, C), bias: (B, C)}`` for ``nn.GroupNorm``, Opacus' formula in chunks.

    Same arithmetic as Opacus' ``compute_group_norm_grad_sample`` (normalise the activations
    without affine, multiply by the output gradient, sum over the rest), a few samples at a
    time: Opacus builds two full-size temporaries per layer, and allocating (page-faulting) them
    cost more than the arithmetic on CPU.
    """
    x = activations[0]
    if x.dtype != backprops.dtype or x.shape[0] == 0:
        return compute_group_norm_grad_sample(layer, activations, backprops)
    n, c = x.shape[:2]
    g = backprops.reshape(n, c, -1)
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        gw = g.new_empty(n, c)
        step = max(1, GN_CHUNK // max(1, x[0].numel()))
        for s in range(0, n, step):
            y = F.group_norm(x[s : s + step], layer.num_groups, eps=layer.eps)
            torch.linalg.vecdot(y.reshape(y.shape[0], c, -1), g[s : s + step], out=gw[s : s + step])
        ret[layer.weight] = gw
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(dim=2)
    return ret


def use_fast_conv2d(enabled: bool = True) -> None:
    """Route Opacus' ``nn.Conv2d`` and ``nn.GroupNorm`` per-sample gradients here (True) or to
    Opacus' own (False)."""
    register_grad_sampler(nn.Conv2d)(conv2d_grad_sample if enabled else compute_conv_grad_sample)
    register_grad_sampler(nn.GroupNorm)(group_norm_grad_sample if enabled else compute_group_norm_grad_sample)


def fast_conv2d_enabled() -> bool:
    """Whether Opacus currently uses :func:`conv2d_grad_sample` for ``nn.Conv2d`` (and
    :func:`group_norm_grad_sample` for ``nn.GroupNorm``)."""
    return GradSampleModule.GRAD_SAMPLERS.get(nn.Conv2d) is conv2d_grad_sample


# --- the convolutions' batch-summed parameter gradients, skipped where DP replaces them ---


class _InputGradOnly(torch.autograd.Function):
    """``F.conv2d`` whose backward gives the input gradient only (None for weight and bias).

    Weight and bias go through ``apply`` so that the output requires grad even when the input
    does not (the first layer), which is what makes Opacus' backward hook fire.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            (weight,), (shape, stride, padding, dilation, groups) = ctx.saved_tensors, ctx.conv
            grad_x = nn_grad.conv2d_input(shape, weight, grad_out, stride=stride, padding=padding,
                                                dilation=dilation, groups=groups)
        return grad_x, None, None, None, None, None, None


class _Live:
    """Whether a GradSampleModule's hooks will compute a layer's per-sample gradients.

    Holds the GradSampleModule weakly (a layer must not own its wrapper): once it is gone, the
    layer is a plain ``nn.Conv2d`` again.
    """

    def __init__(self, gsm: GradSampleModule) -> None:
        self.gsm = weakref.ref(gsm)

    def __call__(self, layer: nn.Conv2d) -> bool:
        gsm = self.gsm()
        # the conditions under which Opacus' capture_activations_hook records a forward
        return (gsm is not None and gsm.hooks_enabled and layer.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in layer.parameters(recurse=False)))


#: layer -> its GradSampleModule's switch. Weak keys, and a deep copy of a layer is not in it:
#: a copy computes its batch gradients like any nn.Conv2d.
_LIVE: weakref.WeakKeyDictionary[nn.Module, _Live] = weakref.WeakKeyDictionary()


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    live = _LIVE.get(self)
    if live is None or not live(self):
        return nn.Conv2d.forward(self, x)
    padding = self.padding
    assert not isinstance(padding, str)  # skip_batch_param_grads() only wraps numeric padding
    return _InputGradOnly.apply(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def skip_batch_param_grads(gsm: GradSampleModule) -> int:
    """Make ``gsm``'s trainable ``nn.Conv2d`` layers skip their batch weight/bias gradients.

    Only layers Opacus computes per-sample gradients for are changed (exact type ``nn.Conv2d``
    with a grad sampler registered, zero padding given as numbers); their ``p.grad`` stays
    ``None`` after ``backward()`` while the hooks are live, and ``DPOptimizer.step`` sets it.
    Returns how many layers were changed; :func:`skips_batch_param_grads` tells them.
    """
    if nn.Conv2d not in GradSampleModule.GRAD_SAMPLERS:
        return 0
    live, count = _Live(gsm), 0
    for layer in gsm._module.modules():
        if (type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                and any(p.requires_grad for p in layer.parameters(recurse=False))):
            _LIVE[layer] = live
            # an instance attribute, as nn.Module's own hooks are: the class and every other
            # nn.Conv2d stay as they are
            vars(layer)["forward"] = types.MethodType(_forward, layer)
            count += 1
    return count


def skips_batch_param_grads(layer: nn.Module) -> bool:
    """Whether ``layer`` was changed by :func:`skip_batch_param_grads` (and its wrapper lives)."""
    return layer in _LIVE and _LIVE[layer].gsm() is not None
