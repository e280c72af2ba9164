from __future__ import annotations

import pytest
import torch

from fedmed.models.attention import Attention, TransformerBlock


@pytest.mark.parametrize("lq,lk", [(1, 5), (4, 4), (3, 7)])
def test_attention_shapes_and_weights(lq, lk):
    attn = Attention(16, 4)
    out, w = attn(torch.randn(2, lq, 16), torch.randn(2, lk, 16), return_weights=True)
    assert out.shape == (2, lq, 16) and w.shape == (2, 4, lq, lk)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, lq))


def test_key_padding_mask_zeroes_masked_keys():
    attn = Attention(8, 2)
    mask = torch.tensor([[False, False, True], [False, True, True]])
    q, kv = torch.randn(2, 1, 8), torch.randn(2, 3, 8)
    _, w = attn(q, kv, key_padding_mask=mask, return_weights=True)
    assert torch.all(w[0, :, :, 2] == 0) and torch.all(w[1, :, :, 1:] == 0)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)


def test_block_keeps_attention_only_when_asked():
    blk = TransformerBlock(16, 4, 0.0)
    x = torch.randn(3, 5, 16)
    assert blk(x).shape == x.shape and blk.last_attention is None
    blk.keep_attention = True
    blk(x)
    assert blk.last_attention.shape == (3, 4, 5, 5) and not blk.last_attention.requires_grad
