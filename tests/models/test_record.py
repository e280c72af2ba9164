from __future__ import annotations

import pytest
import torch

from fedmed.models.record import RecordTransformer

CASES = [(8, [3, 4]), (0, [3]), (5, []), (0, [])]


def _inputs(b, n_num, cards):
    num = torch.randn(b, n_num)
    miss = torch.zeros(b, n_num, dtype=torch.bool)
    if cards:
        cat = torch.stack([torch.randint(0, c + 1, (b,)) for c in cards], 1)
    else:
        cat = torch.zeros(b, 0, dtype=torch.long)
    return num, miss, cat


@pytest.mark.parametrize("n_num,cards", CASES)
def test_tokens_and_attention_shapes(n_num, cards):
    rt = RecordTransformer(
        n_numeric=n_num, cat_cardinalities=cards, dim=16, layers=2, heads=4, dropout=0.1
    )
    b, f = 3, n_num + len(cards)
    tokens = rt(*_inputs(b, n_num, cards))
    assert tokens.shape == (b, 1 + f, 16) and torch.isfinite(tokens).all()
    assert rt.attention_maps().shape == (b, f)


def test_missing_numeric_uses_missing_token_and_ignores_value():
    rt = RecordTransformer(
        n_numeric=3, cat_cardinalities=[2], dim=8, layers=1, heads=2, dropout=0.0
    )
    num, miss, cat = _inputs(2, 3, [2])
    miss[0, 1] = True
    a = rt.embed(num, miss, cat)
    num2 = num.clone()
    num2[0, 1] = float("nan")  # value under a missing flag must not matter (even NaN)
    b = rt.embed(num2, miss, cat)
    torch.testing.assert_close(a, b)
    expected = rt.num_missing.weight[1] + rt.position.weight[2]
    torch.testing.assert_close(a[0, 2], expected)


def test_extra_tokens_with_padding():
    rt = RecordTransformer(n_numeric=2, cat_cardinalities=[], dim=8, layers=1, heads=2, dropout=0.0)
    num, miss, cat = _inputs(2, 2, [])
    extra = torch.randn(2, 4, 8)
    pad = torch.tensor([[False, False, True, True], [False, True, True, True]])
    out = rt(num, miss, cat, extra_tokens=extra, extra_padding_mask=pad)
    assert out.shape == (2, 7, 8)
    w = rt.blocks[-1].last_attention
    assert torch.all(w[0, :, :, 5:] == 0) and torch.all(w[1, :, :, 4:] == 0)


def test_attention_maps_before_forward_raises():
    rt = RecordTransformer(n_numeric=1, cat_cardinalities=[], dim=8, layers=1, heads=2, dropout=0.0)
    with pytest.raises(RuntimeError, match="forward"):
        rt.attention_maps()
