"""Fixtures that write small, real site folders (DICOM via pydicom, PNG via Pillow)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedmed.config import DataConfig

# Ids that must never show up in an error message.
SECRET = "SECRET"
CLASSES = ["benign", "malignant"]


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    signed: bool = False,
) -> Path:
    """A minimal valid DICOM file (Explicit VR Little Endian) holding ``pixels``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = f"{SECRET}-DICOM"
    ds.Modality = "OT"
    color = pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] == 3
                                 and photometric.startswith(("RGB", "YBR")))
    frames = pixels.shape[0] if pixels.ndim == (4 if color else 3) else 1
    rows, cols = pixels.shape[-3:-1] if color else pixels.shape[-2:]
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    dtype = np.uint8 if color else (np.int16 if signed else np.uint16)
    bits = 8 if color else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """An 8-bit gray, RGB, or (uint16 input) 16-bit gray PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _pattern(seed: int, size: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, size * size).reshape(size, size)
    return (base + rng.integers(0, 50, (size, size))).astype(np.uint8)


def default_tables(n: int = 40) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Records for ``n`` patients plus images: two images for some, none for the last
    four (record-only), and two image-only patients that carry their own label."""
    rng = np.random.default_rng(0)
    ids = [f"{SECRET}-{i:04d}" for i in range(n)]
    labels = [CLASSES[i % 3 == 0] for i in range(n)]
    age = rng.normal(60, 10, n).round(1).astype(object)
    age[[1, 5]] = ""
    records = pd.DataFrame({
        "patient_id": ids, "label": labels, "age": age,
        "bp": rng.normal(120, 15, n).round(0).astype(int).astype(str),
        "sex": rng.choice(["F", "M", ""], n), "smoker": rng.choice(["0", "1.0", "1"], n),
    })
    records.loc[3, "sex"] = "X"  # out of vocabulary → counted, not an error
    rows = []
    for i, pid in enumerate(ids[: n - 4]):
        for k in range(1 + (i % 4 == 0)):
            rows.append({"image": f"images/p{i:03d}_{k}.png", "patient_id": pid, "label": ""})
    for j in range(2):
        rows.append({"image": f"images/orphan_{j}.png", "patient_id": f"{SECRET}-IMG-{j}",
                     "label": CLASSES[j]})
    return records, pd.DataFrame(rows)


SiteFactory = Callable[..., Path]


@pytest.fixture
def make_site(tmp_path: Path) -> SiteFactory:
    """``make_site(name, records=..., images=..., edit=...)`` writes a site folder.

    Defaults come from :func:`default_tables`; ``records=None``/``images=None`` omit a
    table; every image row's file is written as a small PNG unless ``write_files=False``.
    """
    _unset: Any = object()

    def make(name: str = "site_a", *, records: Any = _unset, images: Any = _unset,
             write_files: bool = True, records_format: str = "csv") -> Path:
        rec_default, img_default = default_tables()
        records = rec_default if records is _unset else records
        images = img_default if images is _unset else images
        site = tmp_path / name
        site.mkdir(parents=True, exist_ok=True)
        if records is not None:
            if records_format == "parquet":
                records.to_parquet(site / "records.parquet", index=False)
            else:
                records.to_csv(site / "records.csv", index=False)
        if images is not None:
            images.to_csv(site / "images.csv", index=False)
            if write_files:
                for k, rel in enumerate(images["image"]):
                    write_png(site / rel, _pattern(k))
        return site

    return make


@pytest.fixture
def data_cfg(tmp_path: Path) -> DataConfig:
    return DataConfig(
        classes=CLASSES, numeric=["age", "bp"],
        categorical={"sex": ["F", "M"], "smoker": ["0", "1"]},
        image_size=16, channels=1, cache_dir=str(tmp_path / "cache"),
        val_fraction=0.2, test_fraction=0.2, split_seed=0,
    )


@pytest.fixture
def dicom_file() -> Callable[..., Path]:
    """:func:`write_dicom` as a fixture (tests do not import conftest)."""
    return write_dicom


@pytest.fixture
def png_file() -> Callable[..., Path]:
    """:func:`write_png` as a fixture."""
    return write_png


@pytest.fixture
def secret() -> str:
    """The marker every test patient id carries; it must never appear in a message."""
    return SECRET
