"""The fusion model: image CNN + record Transformer + cross-attention fusion (the papers).

``F = Concat(Attn(Q=F_img, KV=record tokens), Attn(Q=F_ehr, KV=image tokens))
+ Concat(F_img, F_ehr)``, then ``Linear(2D→D) → GELU → Dropout → LayerNorm`` and a linear
classifier (logits; softmax/sigmoid is applied outside). ``variant="image"`` / ``"record"``
keep one branch for ablations. A missing modality (``has_image`` / ``has_record`` = 0) is
replaced per sample by a learned embedding. Everything is Opacus-compatible when
``dp_compatible=True`` (the default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from fedmed.errors import UsageError
from fedmed.models.attention import Attention
from fedmed.models.backbones import create_backbone
from fedmed.models.notes import NotesEncoder
from fedmed.models.record import RecordTransformer

if TYPE_CHECKING:
    from fedmed.config import ModelConfig, NotesConfig

__all__ = ["FusionModel", "ImageBranch", "RecordBranch", "Variant", "build_model"]

Variant = Literal["fusion", "image", "record"]
_VARIANTS = ("fusion", "image", "record")


def _mask(m: torch.Tensor | None, batch: int, ref: torch.Tensor) -> torch.Tensor:
    """Modality mask as ``(B, 1, 1)`` in ``ref``'s dtype (all ones when not given)."""
    if m is None:
        return torch.ones(batch, 1, 1, dtype=ref.dtype, device=ref.device)
    return m.reshape(batch, 1, 1).to(dtype=ref.dtype)


class ImageBranch(nn.Module):
    """Backbone → per-location tokens ``(B, h*w, D)`` + pooled ``F_img (B, D)``.

    Images arrive in [0, 1]; they are standardised here with ``image_mean``/``image_std``
    (default: the backbone's ``default_cfg``), held as non-persistent buffers so
    checkpoints and federated updates are unchanged. Un-centred inputs left the
    random-init CNN stuck on one class on HAM10000.
    ``F_img`` is ``LayerNorm(proj(mean of the map))``: pool first, then normalise, as
    timm heads do; normalising every location before pooling (the earlier design) learned
    more slowly in short HAM10000 runs. Tokens for cross-attention keep their LayerNorm.
    """

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(
        self,
        *,
        backbone: str,
        in_chans: int,
        embed_dim: int,
        pretrained_path: str | Path | None = None,
        dp_compatible: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        trainable_stages: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone,
            in_chans=in_chans,
            pretrained_path=pretrained_path,
            dp_compatible=dp_compatible,
            trainable_stages=trainable_stages,
        )
        stats = dict(self.backbone.default_cfg)
        stats.update({k: v for k, v in (("mean", image_mean), ("std", image_std)) if v is not None})
        mean, std = _input_stats(stats, in_chans)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.proj = nn.Linear(self.backbone.num_features, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.missing = nn.Embedding(1, embed_dim)
        self.feature_hw: tuple[int, int] | None = None
        self.tokens = True  # normalised per-location tokens for cross-attention (fusion)

    def forward(
        self, image: torch.Tensor, has_image: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        f = self.backbone(x)
        if f.ndim == 4:  # (B, C, h, w) → (B, h*w, C)
            self.feature_hw = (int(f.shape[2]), int(f.shape[3]))
            f = f.flatten(2).transpose(1, 2)
        else:
            self.feature_hw = None
        proj = self.proj(f)
        # Only the fusion variant reads the tokens; normalising them anyway would call `norm` a
        # second time for nothing, and Opacus then finds no per-sample gradient for it (DP fails).
        tokens = self.norm(proj) if self.tokens else proj
        pooled = self.norm(proj.mean(dim=1))
        b = tokens.shape[0]
        m = _mask(has_image, b, tokens)
        miss = self.missing(torch.zeros(b, 1, dtype=torch.long, device=tokens.device))
        tokens = tokens * m + miss * (1 - m)
        pooled = pooled * m[:, 0] + miss[:, 0] * (1 - m[:, 0])
        return tokens, pooled


def _input_stats(cfg: dict, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg``'s per-channel mean/std as ``(1, in_chans, 1, 1)`` tensors.

    A scalar applies to every channel; RGB statistics for a gray input collapse to their
    mean, so RGB-pretrained defaults still centre a single-channel radiograph.
    """
    out = []
    for key, default in (("mean", 0.0), ("std", 1.0)):
        v = torch.as_tensor(cfg.get(key, default), dtype=torch.float32).flatten()
        if v.numel() != in_chans:
            if v.numel() not in (1, 3):
                raise ValueError(f"image {key} {cfg.get(key)} does not fit {in_chans} channels")
            v = v.mean().expand(in_chans)
        out.append(v.reshape(1, in_chans, 1, 1).clone())
    if (out[1] <= 0).any():
        raise ValueError(f"image std must be positive, got {cfg.get('std')}")
    return out[0], out[1]


class RecordBranch(nn.Module):
    """Record Transformer (+ optional notes tokens) → tokens ``(B, T, D)``, ``F_ehr`` = CLS."""

    def __init__(
        self,
        *,
        n_numeric: int,
        cat_cardinalities: list[int],
        embed_dim: int,
        layers: int,
        heads: int,
        dropout: float,
        notes: NotesConfig | None = None,
        notes_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.transformer = RecordTransformer(
            n_numeric=n_numeric,
            cat_cardinalities=list(cat_cardinalities),
            dim=embed_dim,
            layers=layers,
            heads=heads,
            dropout=dropout,
        )
        self.missing = nn.Embedding(1, embed_dim)
        self.notes: NotesEncoder | None = None
        if notes is not None:
            self.notes = NotesEncoder(
                vocab_size=notes_vocab_size or notes.vocab_size,
                hidden_size=notes.hidden_size,
                layers=notes.layers,
                heads=notes.heads,
                max_length=notes.max_length,
                dropout=dropout,
                encoder_dir=notes.encoder_dir,
            )
            self.notes_proj = nn.Linear(self.notes.hidden_size, embed_dim)

    def forward(
        self,
        num: torch.Tensor,
        num_missing: torch.Tensor,
        cat: torch.Tensor,
        has_record: torch.Tensor | None = None,
        notes_ids: torch.Tensor | None = None,
        notes_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns ``(tokens, F_ehr, key_padding_mask)``; the mask is None without notes."""
        extra = pad = None
        if self.notes is not None:
            if notes_ids is None:
                raise ValueError("notes are enabled in the model but no notes_ids were given")
            if notes_mask is None:
                notes_mask = (notes_ids != 0).long()
            extra = self.notes_proj(self.notes(notes_ids, notes_mask))
            pad = notes_mask == 0
        tokens = self.transformer(num, num_missing, cat, extra_tokens=extra, extra_padding_mask=pad)
        b = tokens.shape[0]
        m = _mask(has_record, b, tokens)
        miss = self.missing(torch.zeros(b, 1, dtype=torch.long, device=tokens.device))
        tokens = tokens * m + miss * (1 - m)
        full_pad = None
        if pad is not None:
            n_keep = 1 + self.transformer.n_features
            keep = torch.zeros(b, n_keep, dtype=torch.bool, device=pad.device)
            full_pad = torch.cat([keep, pad], dim=1)
        return tokens, tokens[:, 0], full_pad


class FusionModel(nn.Module):
    """Image + record (+ notes) classifier; ``forward(**batch_without_label) -> logits``.

    Only the branches the variant needs are built, so every parameter gets a gradient
    (DP optimizers require that).
    """

    def __init__(
        self,
        *,
        variant: Variant = "fusion",
        n_classes: int,
        in_chans: int,
        n_numeric: int,
        cat_cardinalities: list[int],
        backbone: str = "small_cnn",
        pretrained_path: str | Path | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        embed_dim: int = 64,
        record_layers: int = 2,
        heads: int = 4,
        fusion_heads: int = 4,
        dropout: float = 0.3,
        block_dropout: float = 0.1,
        dp_compatible: bool = True,
        trainable_stages: int | None = None,
        notes: NotesConfig | None = None,
        notes_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(_VARIANTS)}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        use_notes = notes is not None and getattr(notes, "enabled", True)
        if variant == "record" and n_numeric + len(cat_cardinalities) == 0 and not use_notes:
            raise UsageError("variant 'record' needs numeric/categorical features or notes")
        self.variant: Variant = variant
        self.n_classes = n_classes
        self.embed_dim = embed_dim
        self.image_branch: ImageBranch | None = None
        self.record_branch: RecordBranch | None = None
        if variant in ("fusion", "image"):
            self.image_branch = ImageBranch(
                backbone=backbone,
                in_chans=in_chans,
                embed_dim=embed_dim,
                pretrained_path=pretrained_path,
                dp_compatible=dp_compatible,
                image_mean=image_mean,
                image_std=image_std,
                trainable_stages=trainable_stages,
            )
            self.image_branch.tokens = variant == "fusion"
        if variant in ("fusion", "record"):
            self.record_branch = RecordBranch(
                n_numeric=n_numeric,
                cat_cardinalities=cat_cardinalities,
                embed_dim=embed_dim,
                layers=record_layers,
                heads=heads,
                dropout=block_dropout,
                notes=notes if use_notes else None,
                notes_vocab_size=notes_vocab_size,
            )
        width = embed_dim
        if variant == "fusion":
            self.attn_img = Attention(embed_dim, fusion_heads, block_dropout)
            self.attn_ehr = Attention(embed_dim, fusion_heads, block_dropout)
            width = 2 * embed_dim
        self.head = nn.Sequential(
            nn.Linear(width, embed_dim), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(embed_dim)
        )
        self.classifier = nn.Linear(embed_dim, n_classes)
        self.last_fusion_attention: dict[str, torch.Tensor] = {}

    def forward(
        self,
        image: torch.Tensor | None = None,
        num: torch.Tensor | None = None,
        num_missing: torch.Tensor | None = None,
        cat: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        has_record: torch.Tensor | None = None,
        notes_ids: torch.Tensor | None = None,
        notes_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample-dict tensors (see docs/architecture.md) → logits ``(B, n_classes)``.

        Inputs the variant does not use are ignored; absent masks mean "present".
        """
        f_img = f_ehr = img_tok = rec_tok = rec_pad = None
        if self.image_branch is not None:
            if image is None:
                raise ValueError(f"variant {self.variant!r} needs `image`")
            img_tok, f_img = self.image_branch(image, has_image)
        if self.record_branch is not None:
            num, num_missing, cat = self._record_inputs(num, num_missing, cat, image)
            rec_tok, f_ehr, rec_pad = self.record_branch(
                num, num_missing, cat, has_record, notes_ids, notes_mask
            )
        if self.variant == "image":
            fused = f_img
        elif self.variant == "record":
            fused = f_ehr
        else:
            assert f_img is not None and f_ehr is not None  # the fusion variant has both branches
            a_img, w_img = self.attn_img(
                f_img.unsqueeze(1), rec_tok, key_padding_mask=rec_pad, return_weights=True
            )
            a_ehr, w_ehr = self.attn_ehr(f_ehr.unsqueeze(1), img_tok, return_weights=True)
            self.last_fusion_attention = {
                "image_to_record": w_img.detach().mean(dim=1)[:, 0],
                "record_to_image": w_ehr.detach().mean(dim=1)[:, 0],
            }
            attended = torch.cat([a_img[:, 0], a_ehr[:, 0]], dim=-1)
            fused = attended + torch.cat([f_img, f_ehr], dim=-1)
        return self.classifier(self.head(fused))

    def _record_inputs(
        self,
        num: torch.Tensor | None,
        num_missing: torch.Tensor | None,
        cat: torch.Tensor | None,
        image: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fill absent record tensors with empty/zero ones of the right batch size."""
        branch = self.record_branch
        assert branch is not None  # only variants with a record branch get here
        rt = branch.transformer
        ref = next((t for t in (num, cat, num_missing, image) if t is not None), None)
        if ref is None:
            raise ValueError(f"variant {self.variant!r} needs `num`/`cat` inputs")
        b, dev = ref.shape[0], ref.device
        if num is None:
            if rt.n_numeric:
                raise ValueError(f"the model has {rt.n_numeric} numeric features but `num` is None")
            num = torch.zeros(b, 0, device=dev)
        if num_missing is None:
            num_missing = torch.zeros(num.shape, dtype=torch.bool, device=dev)
        if cat is None:
            if rt.n_categorical:
                raise ValueError(
                    f"the model has {rt.n_categorical} categorical features but `cat` is None"
                )
            cat = torch.zeros(b, 0, dtype=torch.long, device=dev)
        return num, num_missing, cat

    def gradcam_target(self) -> nn.Module:
        """The module whose output is the last image feature map (the backbone).

        Its output is ``(B, C, h, w)`` for CNNs (tokens ``(B, N, D)`` for ViT-like timm
        models). Raises ``RuntimeError`` for the record-only variant.
        """
        if self.image_branch is None:
            raise RuntimeError("the 'record' variant has no image branch for Grad-CAM")
        return self.image_branch.backbone

    def record_attention(self) -> torch.Tensor:
        """Last record-Transformer layer's CLS → feature attention ``(B, F)`` (last forward)."""
        if self.record_branch is None:
            raise RuntimeError("the 'image' variant has no record branch")
        return self.record_branch.transformer.attention_maps()

    def image_attention(self) -> torch.Tensor:
        """Fusion variant: F_ehr → image-location attention of the last forward, ``(B, h, w)``."""
        w = self.last_fusion_attention.get("record_to_image")
        if w is None or self.image_branch is None:
            raise RuntimeError("no fusion attention stored: run the 'fusion' variant forward first")
        hw = self.image_branch.feature_hw
        return w.reshape(w.shape[0], *hw) if hw is not None else w


def build_model(
    model_cfg: ModelConfig,
    *,
    n_classes: int,
    in_chans: int,
    n_numeric: int,
    cat_cardinalities: list[int],
    notes_vocab_size: int | None = None,
) -> FusionModel:
    """The one entry point: a :class:`FusionModel` from a ``ModelConfig`` and data shapes.

    ``cat_cardinalities[i]`` = number of known categories of feature ``i`` (0 = missing is
    added); ``notes_vocab_size`` = the trained tokenizer's size (default: config's).
    """
    notes = model_cfg.notes if model_cfg.notes.enabled else None
    return FusionModel(
        variant=model_cfg.variant,
        n_classes=n_classes,
        in_chans=in_chans,
        n_numeric=n_numeric,
        cat_cardinalities=list(cat_cardinalities),
        backbone=model_cfg.backbone,
        pretrained_path=model_cfg.pretrained_path,
        image_mean=model_cfg.image_mean,
        image_std=model_cfg.image_std,
        embed_dim=model_cfg.embed_dim,
        record_layers=model_cfg.record_layers,
        heads=model_cfg.heads,
        fusion_heads=model_cfg.fusion_heads,
        dropout=model_cfg.dropout,
        dp_compatible=model_cfg.dp_compatible,
        trainable_stages=model_cfg.trainable_stages,
        notes=notes,
        notes_vocab_size=notes_vocab_size,
    )
