"""Transformer encoder over a patient's clinical features: one token per feature.

Tokens are ``[CLS]`` + numeric tokens (``value * W[i] + b[i]``, or a learned per-feature
"missing" token) + categorical tokens (per-feature embedding, index 0 = missing) + a
learned per-position/type embedding. Every parameter lives in an ``nn.Embedding``,
``nn.Linear`` or ``nn.LayerNorm`` looked up with batch-shaped indices, so Opacus computes
per-sample gradients for all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmed.models.attention import TransformerBlock

__all__ = ["RecordTransformer"]


def _index(n: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device).unsqueeze(0).expand(batch, n)


class RecordTransformer(nn.Module):
    """Clinical features → contextualised tokens ``(B, 1 + F [+ extra], D)``; token 0 is CLS.

    ``cat_cardinalities[i]`` is the vocabulary size ``K_i`` of categorical feature ``i``;
    its embedding has ``K_i + 1`` rows (0 = missing/unknown, 1..K_i = categories).
    """

    def __init__(
        self,
        *,
        n_numeric: int,
        cat_cardinalities: list[int],
        dim: int,
        layers: int,
        heads: int,
        dropout: float,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if n_numeric < 0 or any(c < 1 for c in cat_cardinalities):
            raise ValueError("n_numeric must be >= 0 and every cardinality >= 1")
        self.n_numeric = n_numeric
        self.n_categorical = len(cat_cardinalities)
        self.n_features = n_numeric + self.n_categorical
        self.cls = nn.Embedding(1, dim)
        if n_numeric:
            self.num_weight = nn.Embedding(n_numeric, dim)
            self.num_bias = nn.Embedding(n_numeric, dim)
            self.num_missing = nn.Embedding(n_numeric, dim)
            nn.init.normal_(self.num_bias.weight, std=0.02)
        self.cat_embeds = nn.ModuleList(nn.Embedding(c + 1, dim) for c in cat_cardinalities)
        self.position = nn.Embedding(1 + self.n_features, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        blocks = [TransformerBlock(dim, heads, dropout, mlp_ratio) for _ in range(layers)]
        blocks[-1].keep_attention = True
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)

    def embed(
        self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor
    ) -> torch.Tensor:
        """Feature tokens before the Transformer: ``(B, 1 + F, D)``."""
        batch = num.shape[0] if self.n_numeric else cat.shape[0]
        device = self.cls.weight.device
        tokens = [self.cls(torch.zeros(batch, 1, dtype=torch.long, device=device))]
        if self.n_numeric:
            idx = _index(self.n_numeric, batch, device)
            missing = num_missing.bool().unsqueeze(-1)
            value = torch.nan_to_num(num.float()).masked_fill(num_missing.bool(), 0.0)
            tok = value.unsqueeze(-1) * self.num_weight(idx) + self.num_bias(idx)
            tokens.append(torch.where(missing, self.num_missing(idx), tok))
        for i, emb in enumerate(self.cat_embeds):
            tokens.append(emb(cat[:, i : i + 1].long()))
        x = torch.cat(tokens, dim=1)
        return x + self.position(_index(1 + self.n_features, batch, device))

    def forward(
        self,
        num: torch.Tensor,
        num_missing: torch.Tensor,
        cat: torch.Tensor,
        *,
        extra_tokens: torch.Tensor | None = None,
        extra_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``num (B, n_num)``, ``num_missing (B, n_num)`` bool, ``cat (B, n_cat)`` int64 → tokens.

        ``extra_tokens (B, L, D)`` (e.g. projected notes) join the sequence after the
        features; ``extra_padding_mask (B, L)`` True marks padding among them.
        """
        x = self.embed(num, num_missing, cat)
        mask = None
        if extra_tokens is not None:
            x = torch.cat([x, extra_tokens], dim=1)
            if extra_padding_mask is not None:
                n_keep = 1 + self.n_features
                keep = torch.zeros(x.shape[0], n_keep, dtype=torch.bool, device=x.device)
                mask = torch.cat([keep, extra_padding_mask.bool()], dim=1)
        for blk in self.blocks:
            x = blk(x, key_padding_mask=mask)
        return self.norm(x)

    def attention_maps(self) -> torch.Tensor:
        """Last layer's CLS → feature attention, head-averaged: ``(B, F)`` (rows sum ≤ 1).

        Raises ``RuntimeError`` before the first forward pass.
        """
        last = self.blocks[-1]
        assert isinstance(last, TransformerBlock)
        w = last.last_attention
        if w is None:
            raise RuntimeError("no attention stored yet: run a forward pass first")
        return w.mean(dim=1)[:, 0, 1 : 1 + self.n_features]
