"""Synthetic DICOM cohort: real readable DICOM, site heterogeneity, and a label that both
modalities carry (so fusion has something to beat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedmed.config import load_config
from fedmed.data.importers import synthesize
from fedmed.data.importers.synth import SYNTH_CLASSES, SYNTH_NUMERIC, default_site_sizes

LABS = ["crp", "wbc", "heart_rate", "temperature", "spo2"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize(out, seed=0)


def _decode(path: Path) -> np.ndarray:
    """Minimal viewer pipeline (rescale → window → MONOCHROME1 inversion) for the test."""
    ds = pydicom.dcmread(path)
    val = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    img = np.clip((val - (c - w / 2)) / w, 0, 1)
    return 1 - img if ds.PhotometricInterpretation == "MONOCHROME1" else img


def _blob_feature(img: np.ndarray) -> list[float]:
    local = ndimage.gaussian_filter(img, 2.0) - ndimage.gaussian_filter(img, 10.0)
    return [float(local.max()), float((local > 0.08).sum()), float((local > 0.15).sum())]


def test_layout_and_sizes(cohort) -> None:
    out, report = cohort
    assert default_site_sizes(3) == [400, 250, 150]
    assert [v["patients"] for v in report.sites.values()] == [400, 250, 150]
    for site in report.sites:
        rec = pd.read_csv(out / site / "records.csv")
        img = pd.read_csv(out / site / "images.csv")
        expected = ["patient_id", "label", "sex", *SYNTH_NUMERIC, "notes"]
        assert sorted(rec.columns) == sorted(expected)
        assert set(rec["label"]) == set(SYNTH_CLASSES) and set(rec["sex"]) == {"F", "M"}
        assert list(img.columns) == ["image", "patient_id", "label"]
        assert all((out / site / p).is_file() for p in img["image"])
        rec_ids, img_ids = set(rec["patient_id"]), set(img["patient_id"])
        assert rec_ids - img_ids and img_ids - rec_ids  # both missing modalities present
        assert len(rec_ids ^ img_ids) <= 0.1 * len(rec_ids | img_ids)
        for lab in LABS:
            assert 0.01 < rec[lab].isna().mean() < 0.2, lab
        assert rec["notes"].str.len().gt(10).mean() > 0.9


def test_dicom_headers(cohort) -> None:
    out, report = cohort
    photometric, intercepts = set(), set()
    for site in report.sites:
        row = pd.read_csv(out / site / "images.csv").iloc[0]
        ds = pydicom.dcmread(out / site / row["image"])
        assert ds.PatientID == row["patient_id"] and str(ds.PatientName).startswith("SYNTH^")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.preamble == b"\0" * 128
        assert (ds.Rows, ds.Columns) == (64, 64) and ds.pixel_array.shape == (64, 64)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.Modality in {"CT", "DX", "CR"} and ds.Manufacturer
        assert len(ds.StudyDate) == 8 and ds.PixelSpacing and "WindowWidth" in ds
        photometric.add(ds.PhotometricInterpretation)
        intercepts.add((float(ds.RescaleSlope), float(ds.RescaleIntercept)))
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}  # inversion gets exercised
    assert len(intercepts) > 1  # site-specific rescale


def test_site_heterogeneity(cohort) -> None:
    out, report = cohort
    prev = [v["label_counts"]["positive"] / sum(v["label_counts"].values())
            for v in report.sites.values()]
    assert max(prev) - min(prev) > 0.15  # label skew


def test_label_depends_on_image_and_record(cohort) -> None:
    out, report = cohort
    frames = []
    for site in report.sites:
        rec = pd.read_csv(out / site / "records.csv")
        img = pd.read_csv(out / site / "images.csv")
        feats = pd.DataFrame([_blob_feature(_decode(out / site / p)) for p in img["image"]],
                             columns=["blob_max", "blob_area08", "blob_area15"])
        feats["patient_id"] = img["patient_id"]
        both = rec.merge(feats, on="patient_id")
        both["site"] = site
        frames.append(both)
    df = pd.concat(frames, ignore_index=True)
    df["log_crp"] = np.log(df["crp"])
    y = (df["label"] == "positive").to_numpy()
    site = pd.get_dummies(df["site"]).astype(float)
    image_cols = ["blob_max", "blob_area08", "blob_area15"]
    record_cols = ["age", "log_crp", "wbc", "heart_rate", "temperature", "spo2"]

    def score(cols: list[str]) -> float:
        X = pd.concat([df[cols], site], axis=1).to_numpy()
        model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                              LogisticRegression(max_iter=1000))
        return cross_val_score(model, X, y, cv=5, scoring="balanced_accuracy").mean()

    image, record, fused = score(image_cols), score(record_cols), score(image_cols + record_cols)
    assert image > 0.65 and record > 0.62, (image, record)
    assert fused > max(image, record) + 0.05, (image, record, fused)


def test_deterministic_and_options(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", sites=2, patients_per_site=[40, 30], image_size=32, seed=3,
                   notes=False)
    synthesize(tmp_path / "b", sites=2, patients_per_site=[40, 30], image_size=32, seed=3)
    ra = pd.read_csv(tmp_path / "a" / "hospital_b" / "records.csv")
    rb = pd.read_csv(tmp_path / "b" / "hospital_b" / "records.csv")
    assert "notes" not in ra.columns
    pd.testing.assert_frame_equal(ra, rb.drop(columns="notes"))  # notes do not shift labs
    da = pydicom.dcmread(tmp_path / "a" / "hospital_a" / "images" / "hospital_a-p0001.dcm")
    db = pydicom.dcmread(tmp_path / "b" / "hospital_a" / "images" / "hospital_a-p0001.dcm")
    assert da.SOPInstanceUID == db.SOPInstanceUID and da.PixelData == db.PixelData
    assert da.Rows == 32
    cfg = load_config(a.config_path)
    assert cfg.data.notes_column is None and cfg.data.image_size == 32
    assert cfg.data.categorical == {"sex": ["F", "M"]} and cfg.data.channels == 1
    with pytest.raises(ValueError, match="one per site"):
        synthesize(tmp_path / "c", sites=3, patients_per_site=[40, 30])
