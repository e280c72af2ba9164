"""Free-text clinical notes: a locally trained WordPiece tokenizer and a small BERT encoder.

Nothing is downloaded: the tokenizer is trained on the site's own texts (or read from a
local folder) and the encoder is randomly initialised from a small ``BertConfig`` (or read
from a local folder). The encoder is Opacus-compatible when called through
:class:`NotesEncoder`, which passes batch-shaped position/token-type ids.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "NotesEncoder",
    "SPECIAL_TOKENS",
    "load_tokenizer",
    "make_tokenize_fn",
    "train_tokenizer",
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def _clean(texts: Iterable[Any]) -> list[str]:
    """None / NaN / non-strings → strings ("" for missing)."""
    out = []
    for t in texts:
        if t is None or (isinstance(t, float) and math.isnan(t)):
            out.append("")
        else:
            out.append(str(t))
    return out


def train_tokenizer(texts: list[str], *, vocab_size: int, out_dir: str | Path | None = None) -> Any:
    """Train a lowercase WordPiece tokenizer on ``texts``; save it to ``out_dir`` if given.

    Returns a ``transformers.PreTrainedTokenizerFast`` that adds ``[CLS] … [SEP]`` and
    pads with ``[PAD]`` (id 0). Its vocabulary may be smaller than ``vocab_size``.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator([t for t in _clean(texts) if t], trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer saved by :func:`train_tokenizer` (or any local one); no network."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def make_tokenize_fn(
    tokenizer: Any, max_length: int
) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """A callable ``texts -> {"input_ids", "attention_mask"}`` int64 ``(N, max_length)``.

    Pads/truncates to exactly ``max_length``; None/NaN become "" (just ``[CLS] [SEP]``).
    """

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            _clean(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
        }

    return tokenize


class NotesEncoder(nn.Module):
    """A small ``transformers`` BERT (random init, eager attention) or a local one.

    ``dropout`` applies to the freshly built BERT; a local one keeps its own config.

    ``forward(ids, mask) -> (B, L, hidden_size)`` token states; the fusion model projects
    them to its own width.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        layers: int,
        heads: int,
        max_length: int,
        dropout: float = 0.1,
        encoder_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if encoder_dir is not None:
            if not Path(encoder_dir).is_dir():
                raise FileNotFoundError(f"notes encoder folder not found: {encoder_dir}")
            self.bert = AutoModel.from_pretrained(
                str(encoder_dir), local_files_only=True, attn_implementation="eager"
            )
        else:
            if hidden_size % heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by heads ({heads})"
                )
            cfg = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=2 * hidden_size,
                max_position_embeddings=max(max_length, 8),
                type_vocab_size=1,
                pad_token_id=0,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            cfg._attn_implementation = "eager"
            self.bert = BertModel(cfg, add_pooling_layer=False)
        self.hidden_size = int(self.bert.config.hidden_size)
        self.max_length = max_length
        params = inspect.signature(self.bert.forward).parameters
        self._pass_positions = "position_ids" in params
        self._pass_types = "token_type_ids" in params and getattr(
            self.bert.config, "type_vocab_size", 0
        ) > 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask (B, L)`` int64 → ``(B, L, hidden_size)``."""
        b, n = ids.shape
        # batch-shaped position/type ids: Opacus needs the batch dim on every embedding input
        kwargs: dict[str, torch.Tensor] = {}
        if self._pass_positions:
            kwargs["position_ids"] = torch.arange(n, device=ids.device).unsqueeze(0).expand(b, n)
        if self._pass_types:
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        out = self.bert(input_ids=ids, attention_mask=mask, **kwargs)
        return out.last_hidden_state
