"""Shared helpers for the model tests: a random batch that follows the sample-dict contract."""

from __future__ import annotations

import warnings

import pytest
import torch

N_NUMERIC = 8
CARDS = [3, 4]


def make_batch(
    batch: int = 4,
    *,
    in_chans: int = 1,
    size: int = 32,
    n_numeric: int = N_NUMERIC,
    cards: list[int] | None = None,
    missing: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Contract-shaped inputs; ``missing`` blanks some images / records / feature values."""
    cards = CARDS if cards is None else cards
    g = torch.Generator().manual_seed(seed)
    out = {
        "image": torch.rand(batch, in_chans, size, size, generator=g),
        "num": torch.randn(batch, n_numeric, generator=g),
        "num_missing": torch.zeros(batch, n_numeric, dtype=torch.bool),
        "cat": torch.stack(
            [torch.randint(0, c + 1, (batch,), generator=g) for c in cards], dim=1
        )
        if cards
        else torch.zeros(batch, 0, dtype=torch.long),
        "has_image": torch.ones(batch),
        "has_record": torch.ones(batch),
    }
    if missing:
        out["has_image"][0] = 0.0
        out["image"][0] = 0.0
        out["has_record"][1] = 0.0
        out["num"][1] = 0.0
        out["num_missing"][1] = True
        if cards:
            out["cat"][1] = 0
        if n_numeric:
            out["num_missing"][2, 0] = True
            out["num"][2, 0] = 0.0
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: intra-op threads only add wake-up cost (10x slower on a
    # busy 2-core machine). Restored after each test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_hooks():
    # Opacus' full backward hooks warn when image inputs don't require grad; harmless here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@pytest.fixture
def make_inputs():
    """The :func:`make_batch` factory (a fixture: conftest modules are not importable)."""
    return make_batch
