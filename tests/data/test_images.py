"""fedmed.data.images: reading, preprocessing and the decoded-image cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fedmed.data.images as images_mod
from fedmed.data.images import (
    ImageCache,
    ImageError,
    Preprocess,
    preprocess,
    read_image,
    shades_of_grey,
)

GRAY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
RGB = np.stack([GRAY, 255 - GRAY, np.full_like(GRAY, 128)], axis=-1)


@pytest.mark.parametrize(
    "name, pixels, shape, top",
    [
        ("gray.png", GRAY, (8, 8), 255.0),
        ("rgb.png", RGB, (8, 8, 3), 255.0),
        ("deep.png", GRAY.astype(np.uint16) * 256, (8, 8), 65535.0),  # 16-bit PNG
        ("gray.bmp", GRAY, (8, 8), 255.0),
        ("gray.tif", GRAY, (8, 8), 255.0),
    ],
)
def test_read_raster(tmp_path, png_file, name, pixels, shape, top):
    img = read_image(png_file(tmp_path / name, pixels))
    assert img.shape == shape and img.dtype == np.float32
    np.testing.assert_allclose(img, pixels.astype(np.float32) / top, atol=1e-6)


def test_read_jpeg(tmp_path, png_file):
    img = read_image(png_file(tmp_path / "photo.jpg", RGB))
    assert img.shape == (8, 8, 3) and 0.0 <= img.min() and img.max() <= 1.0


@pytest.mark.parametrize("name", ["scan.dcm", "scan.DICOM", "scan"])
def test_dicom_routes(tmp_path, dicom_file, name):
    path = dicom_file(tmp_path / name, np.arange(100, dtype=np.uint16).reshape(10, 10))
    img = read_image(path)
    assert img.shape == (10, 10) and img.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("notes.txt", b"hello", "unsupported image type"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
        ("noise.jpg", np.random.default_rng(1).bytes(500), "not a readable image"),
        ("noise.dcm", np.random.default_rng(2).bytes(500), "not a DICOM file"),
        ("absent.png", None, "file not found"),
    ],
)
def test_bad_files_raise_image_error_without_the_file_name(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        read_image(path)
    # file names are often built from patient ids: the message says why, .path says which
    assert Path(name).stem not in str(err.value) and str(tmp_path) not in str(err.value)
    assert err.value.path == str(path)


def test_preprocess_spec_key_and_config():
    a = Preprocess(size=32, channels=1)
    assert a.key() == Preprocess(size=32, channels=1).key()
    others = [Preprocess(size=33), Preprocess(size=32, channels=3), Preprocess(size=32, clahe=True),
              Preprocess(size=32, denoise=True), Preprocess(size=32, window=(40, 400)),
              Preprocess(size=32, color_constancy=True)]
    assert len({a.key(), *(o.key() for o in others)}) == 7
    # caches written before colour constancy existed stay valid
    old = json.dumps({"v": images_mod._CACHE_VERSION, "size": 32, "channels": 1, "window": None,
                      "clahe": False, "denoise": False}, sort_keys=True)
    assert a.key() == hashlib.sha1(old.encode()).hexdigest()[:16]
    cfg = SimpleNamespace(image_size=24, channels=3, window=(40, 400), clahe=True, denoise=False,
                          color_constancy=True)
    spec = Preprocess.from_config(cfg)
    assert spec == Preprocess(size=24, channels=3, window=(40.0, 400.0), clahe=True,
                              color_constancy=True)
    with pytest.raises(ValueError, match="channels"):
        Preprocess(size=8, channels=2)


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((20, 30), Preprocess(size=16, channels=1)),
        ((20, 30), Preprocess(size=16, channels=3)),
        ((20, 30, 3), Preprocess(size=16, channels=1)),
        ((20, 30, 3), Preprocess(size=8, channels=3, clahe=True, denoise=True)),
        ((40, 40), Preprocess(size=40, channels=1, clahe=True, denoise=True)),
    ],
)
def test_preprocess_shapes(shape, spec):
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    out = preprocess(img, spec)
    assert out.dtype == np.uint8 and out.shape == (spec.channels, spec.size, spec.size)


def test_channel_conversions():
    gray = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    three = preprocess(gray, Preprocess(size=8, channels=3))
    assert (three[0] == three[1]).all() and (three[1] == three[2]).all()
    red = np.zeros((8, 8, 3), dtype=np.float32)
    red[..., 0] = 1.0
    one = preprocess(red, Preprocess(size=8, channels=1))
    assert one.shape == (1, 8, 8) and np.all(one == round(0.299 * 255))


def test_shades_of_grey_removes_a_tint_and_keeps_grey():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.uniform(0.2, 0.8, (16, 16, 1)), 3, axis=-1).astype(np.float32)
    np.testing.assert_allclose(shades_of_grey(grey), grey, atol=1e-6)
    pink = np.clip(grey * np.array([1.0, 0.7, 0.75], dtype=np.float32), 0, 1)  # a centre's tint
    fixed = shades_of_grey(pink)
    assert fixed.shape == pink.shape and fixed.dtype == np.float32
    means = fixed.mean(axis=(0, 1))
    assert means.max() - means.min() < 0.02 < np.ptp(pink.mean(axis=(0, 1)))
    np.testing.assert_array_equal(shades_of_grey(grey[..., 0]), grey[..., 0])  # one channel
    assert not shades_of_grey(np.zeros((4, 4, 3), np.float32)).any()
    out = preprocess(pink, Preprocess(size=8, channels=3, color_constancy=True))
    assert np.ptp(out.reshape(3, -1).mean(axis=1)) < 0.02 * 255


def _counting_reader(monkeypatch):
    calls = []
    real = images_mod.read_image

    def reader(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(images_mod, "read_image", reader)
    return calls


def test_cache_hits_do_not_decode_again(tmp_path, png_file, monkeypatch):
    calls = _counting_reader(monkeypatch)
    src = png_file(tmp_path / "img.png", GRAY)
    spec = Preprocess(size=4, channels=1)
    cache = ImageCache(tmp_path / "cache", spec)
    first = cache.load(src)
    second = cache.load(src)
    assert (cache.misses, cache.hits, len(calls)) == (1, 1, 1)
    np.testing.assert_array_equal(first, second)
    files = list((tmp_path / "cache" / spec.key()).iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temp files left behind

    fresh = ImageCache(tmp_path / "cache", spec)  # a new process: served from disk
    np.testing.assert_array_equal(fresh.load(src), first)
    assert (fresh.misses, fresh.hits, len(calls)) == (0, 1, 1)

    os.utime(src, ns=(1, 1))  # the file changed → decoded again
    fresh.load(src)
    assert fresh.misses == 1 and len(calls) == 2


def test_cache_memo_is_bounded_and_read_only(tmp_path, png_file):
    src = png_file(tmp_path / "img.png", GRAY)
    cache = ImageCache(tmp_path / "c", Preprocess(size=4), memo_bytes=1)
    arr = cache.load(src)
    assert not arr.flags.writeable and cache._memo == {}
    cache.load(src)
    assert cache.hits == 1  # from disk, not the memo


def test_cache_default_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMED_CACHE_DIR", str(tmp_path / "envcache"))
    spec = Preprocess(size=4)
    assert ImageCache(None, spec).dir == tmp_path / "envcache" / spec.key()


def test_prepare_reports_all_failures_at_once(tmp_path, png_file):
    good = [png_file(tmp_path / f"ok{i}.png", GRAY) for i in range(3)]
    (tmp_path / "bad1.png").write_bytes(b"not a png")
    bad = [tmp_path / "bad1.png", tmp_path / "gone.png", tmp_path / "x.gif"]
    cache = ImageCache(tmp_path / "cache", Preprocess(size=4))
    where = [f"images.csv line {n}, column 'image'" for n in range(2, 9)]
    with pytest.raises(ImageError) as err:
        cache.prepare([*good, *bad, good[0]], where=where, progress=False)
    msg = str(err.value)
    assert msg.startswith("3 of 6 images could not be read")
    assert all(f"images.csv line {n}, column 'image'" in msg for n in (5, 6, 7))
    assert "line 2," not in msg and "line 8," not in msg  # good files (line 8 repeats line 2)
    assert not any(p.stem in msg for p in [*good, *bad]) and str(tmp_path) not in msg
    assert cache.misses == 3  # the good ones are cached anyway
    cache.prepare(good, progress=False)  # already cached: nothing decoded
    assert cache.misses == 3
