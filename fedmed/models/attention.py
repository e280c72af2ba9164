"""Multi-head attention from plain ``nn.Linear`` layers, and a pre-norm Transformer block.

Written out (not ``nn.MultiheadAttention``) so Opacus can compute per-sample gradients
with its Linear grad sampler, and so attention weights can be returned for explanations.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Attention", "TransformerBlock"]


class Attention(nn.Module):
    """Multi-head scaled dot-product attention: queries from ``q_in``, keys/values ``kv_in``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        q_in: torch.Tensor,
        kv_in: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``q_in (B, Lq, D)``, ``kv_in (B, Lk, D)`` → ``(B, Lq, D)``.

        ``key_padding_mask (B, Lk)``: True marks keys to ignore (``nn.MultiheadAttention``
        convention). With ``return_weights`` also returns the weights ``(B, heads, Lq, Lk)``
        (before dropout).
        """
        q = self._split(self.q(q_in))
        k = self._split(self.k(kv_in))
        v = self._split(self.v(kv_in))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if key_padding_mask is not None:
            fill = torch.finfo(scores.dtype).min
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].bool(), fill)
        weights = scores.softmax(dim=-1)
        out = torch.matmul(self.drop(weights), v)
        b, _, lq, _ = out.shape
        out = self.out(out.transpose(1, 2).reshape(b, lq, self.heads * self.head_dim))
        return (out, weights) if return_weights else out


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU MLP, residual; keeps its last attention if asked.

    Set ``keep_attention = True`` to store the last weights ``(B, heads, L, L)``
    (detached) in ``last_attention``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * mlp_ratio, dim),
            nn.Dropout(dropout),
        )
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm1(x)
        a, w = self.attn(h, h, key_padding_mask=key_padding_mask, return_weights=True)
        if self.keep_attention:
            self.last_attention = w.detach()
        x = x + self.drop(a)
        return x + self.mlp(self.norm2(x))
