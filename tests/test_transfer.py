"""Packed weights: exact round trip, half precision halves the bytes, bad layouts refused."""

import numpy as np
import pytest
import torch

from fedmed.config import ModelConfig
from fedmed.models import build_model
from fedmed.transfer import HALF, nbytes, pack, unpack, widen


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), n_classes=2, in_chans=1, n_numeric=6, cat_cardinalities=[2])
    return model.state_dict()


def _size(record) -> int:
    return sum(a.numpy().nbytes for a in record.values())


def test_round_trip_is_exact_and_compact():
    state = _state()
    rec = pack(state)
    assert len(rec) <= 3 < len(state)  # a few arrays, not one per tensor
    back = unpack(rec, state)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k
    assert _size(rec) == nbytes(state)


def test_half_precision_halves_the_floats_and_restores_dtypes():
    state = _state()
    half = pack(state, half=True)
    assert _size(half) <= 0.51 * nbytes(state)
    assert half["float32"].numpy().dtype == HALF
    back = unpack(half, state)
    err = max(float(np.abs(back[k] - v.numpy()).max()) for k, v in state.items())
    assert back["classifier.weight" if "classifier.weight" in back else next(iter(back))].dtype == np.float32
    assert 0 < err < 1e-2  # rounding, not garbage
    wide = widen(half, pack(state))
    assert wide["float32"].numpy().dtype == np.float32


def test_a_record_for_another_model_is_refused():
    state = _state()
    other = {k: v for k, v in list(state.items())[:-3]}
    with pytest.raises(ValueError, match="do not fit this model"):
        unpack(pack(other), state)
