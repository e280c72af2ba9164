"""fedmed.data.dataset: the sample-dict contract, train-only fitting and augmentation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedmed.config import DataConfig
from fedmed.data.dataset import build_splits, class_counts, train_augment, train_transform
from fedmed.data.images import ImageCache, ImageError, Preprocess
from fedmed.data.records import to_numeric
from fedmed.data.site import load_site

# key -> (dtype, shape) for data_cfg: 1 channel, 16x16, 2 numeric, 2 categorical
CONTRACT = {
    "image": (torch.float32, (1, 16, 16)),
    "num": (torch.float32, (2,)),
    "num_missing": (torch.bool, (2,)),
    "cat": (torch.int64, (2,)),
    "has_image": (torch.float32, ()),
    "has_record": (torch.float32, ()),
    "label": (torch.int64, ()),
}


@pytest.fixture
def splits(make_site, data_cfg):
    site = load_site(make_site(), data_cfg)
    cache = ImageCache(data_cfg.cache_dir, Preprocess.from_config(data_cfg))
    return site, build_splits(site, data_cfg, cache=cache, progress=False)


def test_items_follow_the_contract(splits):
    _, sp = splits
    for ds in (sp.train, sp.val, sp.test):
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == set(CONTRACT)
            for key, (dtype, shape) in CONTRACT.items():
                assert item[key].dtype == dtype and tuple(item[key].shape) == shape, key
            assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_missing_modalities(splits):
    site, sp = splits
    seen = {"image_only": 0, "record_only": 0}
    for ds in (sp.train, sp.val, sp.test):
        for i in range(len(ds)):
            item = ds[i]
            if item["has_record"] == 0:
                seen["image_only"] += 1
                assert item["num"].eq(0).all() and item["num_missing"].all()
                assert item["cat"].eq(0).all() and item["has_image"] == 1
            if item["has_image"] == 0:
                seen["record_only"] += 1
                assert item["image"].eq(0).all() and item["has_record"] == 1
    assert seen == {"image_only": 2, "record_only": 4}


def test_encoder_fitted_on_train_patients_only(splits):
    site, sp = splits
    train_ids = site.samples.iloc[sp.indices["train"]]["patient_id"].unique()
    train_rec = site.records.loc[[i for i in train_ids if i in site.records.index]]
    assert sp.encoder.mean[0] == pytest.approx(to_numeric(train_rec["age"]).mean())
    assert sp.encoder.mean[0] != pytest.approx(to_numeric(site.records["age"]).mean())
    held = site.samples.iloc[np.concatenate([sp.indices["val"], sp.indices["test"]])]
    assert not set(held["patient_id"]) & set(train_ids)


def test_augmentation_is_train_only(splits):
    _, sp = splits
    assert sp.train.transform is not None and sp.val.transform is None and sp.test.transform is None
    i = int(np.flatnonzero(sp.train.has_image.numpy())[0])
    torch.manual_seed(0)
    a, b = sp.train[i]["image"], sp.train[i]["image"]
    assert not torch.equal(a, b)  # random crop and jitter make two draws differ
    j = int(np.flatnonzero(sp.val.has_image.numpy())[0])
    assert torch.equal(sp.val[j]["image"], sp.val[j]["image"])


@pytest.mark.parametrize("channels", [1, 3])
def test_train_augment_keeps_shape_and_range(channels):
    out = train_augment(16, channels)(torch.rand(channels, 16, 16))
    assert out.shape == (channels, 16, 16) and 0.0 <= out.min() and out.max() <= 1.0


def test_train_augment_never_paints_a_border():
    """No zero-filled corners (rotation/zoom-out): a flat image stays flat-ish everywhere."""
    torch.manual_seed(0)
    aug = train_augment(24, 3)
    for _ in range(20):
        out = aug(torch.full((3, 24, 24), 0.5))
        assert out.min() > 0.3, "augmentation introduced dark (zero-filled) pixels"


def test_any_orientation_adds_quarter_turns_without_painted_corners():
    """Dermoscopy-style augmentation: the bright corner lands in every corner, none go black."""
    torch.manual_seed(0)
    img = torch.full((3, 24, 24), 0.5)
    img[:, :8, :8] = 0.9  # a bright top-left quadrant
    seen = set()
    for aug, name in ((train_augment(24, 3), "plain"), (train_augment(24, 3, any_orientation=True), "any")):
        corners = set()
        for _ in range(60):
            out = aug(img)
            assert out.min() > 0.3, "augmentation introduced dark (zero-filled) pixels"
            q = [out[:, :6, :6].mean(), out[:, :6, -6:].mean(), out[:, -6:, :6].mean(), out[:, -6:, -6:].mean()]
            corners.add(int(torch.stack(q).argmax()))
        seen.add((name, len(corners)))
    assert ("plain", 2) in seen  # horizontal flip only: the bright quadrant stays on top
    assert ("any", 4) in seen


def test_train_transform_follows_the_config():
    cfg = DataConfig(root=".", classes=["a", "b"], channels=3, image_size=16, any_orientation=True)
    assert train_transform(cfg) is not None
    assert train_transform(cfg.model_copy(update={"augment": False})) is None


def test_loader_batches_and_class_counts(splits):
    site, sp = splits
    batch = next(iter(DataLoader(sp.train, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["label"].shape == (4,)
    counts = class_counts(sp.train, 2)
    assert counts.sum() == len(sp.train) and (counts > 0).all()
    total = sum(class_counts(d, 2) for d in (sp.train, sp.val, sp.test))
    assert total.tolist() == list(site.summary.label_counts.values())
    assert sp.summary is site.summary and sp.train.labels.dtype == np.int64


def test_notes_are_tokenised_once(make_site, data_cfg):
    import pandas as pd

    site_dir = make_site()
    rec = pd.read_csv(site_dir / "records.csv", dtype=str)
    rec["notes"] = ["cough" if k % 2 else "no complaints today" for k in range(len(rec))]
    rec.to_csv(site_dir / "records.csv", index=False)
    data_cfg.notes_column = "notes"
    calls = []

    def tokenizer(texts):
        calls.append(len(texts))
        ids = torch.zeros(len(texts), 6, dtype=torch.long)
        for k, t in enumerate(texts):
            n = min(len(t.split()), 6)
            ids[k, :n] = torch.arange(1, n + 1)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    sp = build_splits(load_site(site_dir, data_cfg), data_cfg, cache=None, tokenizer=tokenizer,
                      progress=False)
    assert len(calls) == 3  # once per split, in __init__
    item = sp.train[0]
    assert item["notes_ids"].dtype == torch.int64 and item["notes_ids"].shape == (6,)
    assert item["notes_mask"].shape == (6,)


def test_without_cache_images_are_not_loaded(make_site, data_cfg):
    sp = build_splits(load_site(make_site(), data_cfg), data_cfg, cache=None, progress=False)
    item = sp.train[0]
    assert item["image"].shape == (1, 16, 16) and item["has_image"] == 0


def test_a_site_without_loaded_images_builds_no_augmentation(make_site, data_cfg):
    """Only loaded images are augmented, so without a cache none is built, and torchvision (with
    torch._dynamo, ~1.9 CPU-s in every site runner) is never imported (a fresh interpreter)."""
    assert data_cfg.augment  # the config asks for augmentation: its absence is the point
    code = ("import sys\n"
            "from fedmed.config import DataConfig\n"
            "from fedmed.data.dataset import build_splits\n"
            "from fedmed.data.site import load_site\n"
            "cfg = DataConfig.model_validate_json(sys.argv[2])\n"
            "sp = build_splits(load_site(sys.argv[1], cfg), cfg, cache=None, progress=False)\n"
            "item = sp.train[0]\n"
            "print(sp.train.transform is None, 'torchvision' in sys.modules, float(item['has_image']))\n")
    out = subprocess.run([sys.executable, "-c", code, str(make_site()), data_cfg.model_dump_json()],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "0.0"]


def test_corrupt_image_fails_up_front(make_site, data_cfg):
    site_dir = make_site()
    (site_dir / "images" / "p002_0.png").write_bytes(b"garbage")
    (site_dir / "images" / "p003_0.png").write_bytes(b"")
    site = load_site(site_dir, data_cfg)
    cache = ImageCache(data_cfg.cache_dir, Preprocess.from_config(data_cfg))
    with pytest.raises(ImageError, match="2 of 47 images could not be read") as err:
        build_splits(site, data_cfg, cache=cache, progress=False)
    msg = str(err.value)
    assert "p002" not in msg and "p003" not in msg and "SECRET" not in msg
    assert str(site_dir) not in msg and "images.csv line" in msg and "column 'image'" in msg


@pytest.mark.parametrize("content", [b"", b"DICM" * 40, None], ids=["empty", "garbage", "truncated"])
def test_corrupt_dicom_named_after_a_patient_id_is_named_by_line(make_site, data_cfg, secret,
                                                                  content):
    """A DICOM file whose name is the patient's id: the error gives the images.csv line and
    column, never the id, the file name or the absolute path (those go to the debug log)."""
    import logging

    import pandas as pd
    from pydicom.data import get_testdata_file

    site_dir = make_site()
    images = pd.read_csv(site_dir / "images.csv", dtype=str, keep_default_na=False)
    row = 7
    pid = images.loc[row, "patient_id"]
    assert secret in pid
    images.loc[row, "image"] = f"images/{pid}.dcm"
    images.to_csv(site_dir / "images.csv", index=False)
    bad = site_dir / "images" / f"{pid}.dcm"
    real = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    bad.write_bytes(real[: len(real) // 2] if content is None else content)
    site = load_site(site_dir, data_cfg)
    cache = ImageCache(data_cfg.cache_dir, Preprocess.from_config(data_cfg))
    logger = logging.getLogger("fedmed.data.images")
    seen: list[str] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(ImageError, match="1 of 47 images could not be read") as err:
            build_splits(site, data_cfg, cache=cache, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    msg = str(err.value)
    assert f"images.csv line {row + 2}, column 'image'" in msg  # header is line 1
    assert pid not in msg and secret not in msg and str(site_dir) not in msg and ".dcm" not in msg
    assert any(str(bad) in m for m in seen)  # the full path only in the site's debug log
