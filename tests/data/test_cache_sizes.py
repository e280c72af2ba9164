"""The decoded-image cache at the resolutions pretrained backbones want (128–224 px), on real
HAM10000 dermoscopy JPEGs: decoded once, served from disk by a fresh cache, augmented to size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.data.dataset import train_augment
from fedmed.data.images import ImageCache, Preprocess

HAM = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ham10000" / "images").resolve()


@pytest.mark.skipif(not HAM.is_dir(), reason=f"real HAM10000 images not found at {HAM} (../shared is absent)")
@pytest.mark.parametrize("size", [128, 160, 224])
def test_cache_serves_real_images_at_pretrained_sizes(tmp_path, size):
    paths = sorted(HAM.glob("ISIC_*.jpg"))[:6]
    spec = Preprocess(size=size, channels=3)
    first = ImageCache(tmp_path, spec)
    first.prepare(paths, progress=False)
    assert first.misses == len(paths)
    again = ImageCache(tmp_path, spec)  # a new process: everything comes from the .npy files
    arrays = [again.load(p) for p in paths]
    assert again.misses == 0 and again.hits == len(paths)
    for a in arrays:
        assert a.dtype == np.uint8 and a.shape == (3, size, size) and 20 < a.mean() < 235
    # the whole 3,632-image set fits the in-memory memo at 224 px (uint8: 147 KiB an image)
    assert 3632 * 3 * 224 * 224 < again.memo_bytes
    out = train_augment(size, 3, any_orientation=True)(torch.from_numpy(arrays[0].copy()).float() / 255)
    assert out.shape == (3, size, size)
