"""fedmed predict: new patients (no labels) → calibrated probabilities keyed by their own ids."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedmed.checkpoint import load_checkpoint
from fedmed.fit_check import DataMismatch
from fedmed.predict import dataset_for, logits_of, predict, probabilities, read_input

_spec = importlib.util.spec_from_file_location("export_tests", Path(__file__).with_name("test_export.py"))
_export_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_export_tests)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory, synth_root, cache_dir) -> Path:
    return _export_tests.trained_checkpoint(synth_root, tmp_path_factory.mktemp("predict"))


def _unlabelled_copy(site: Path, dst: Path) -> Path:
    """The site as new patients arrive: same files, no label column anywhere."""
    shutil.copytree(site, dst)
    for name in ("records.csv", "images.csv"):
        df = pd.read_csv(dst / name, dtype=str)
        df.drop(columns=["label"]).to_csv(dst / name, index=False)
    return dst


def test_predict_csv_round_trip_without_labels(ckpt_path, synth_root, tmp_path):
    from fedmed.cli import main

    site = _unlabelled_copy(synth_root / "hospital_b", tmp_path / "new_patients")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(ckpt_path), "--input", str(site), "--out", str(out)]) == 0
    got = pd.read_csv(out, dtype={"patient_id": str, "image": str}, keep_default_na=False)

    images = pd.read_csv(site / "images.csv", dtype=str)
    records = pd.read_csv(site / "records.csv", dtype=str)
    expected_rows = len(images) + len(set(records["patient_id"]) - set(images["patient_id"]))
    assert len(got) == expected_rows
    # keyed by the input's own ids: every image row is there under its patient id and path
    keyed = got[got["image"] != ""]
    assert (sorted(zip(keyed["patient_id"], keyed["image"], strict=True))
            == sorted(zip(images["patient_id"], images["image"], strict=True)))
    probs = got[["p_negative", "p_positive"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (got["predicted"] == np.where(probs[:, 1] > probs[:, 0], "positive", "negative")).all()

    # the same numbers as the model itself at the checkpoint's temperature (1.7)
    ckpt = load_checkpoint(ckpt_path)
    ds, source = dataset_for(ckpt, read_input(site, ckpt.config.data))
    assert source == "checkpoint"
    want = probabilities(logits_of(ckpt.build_model(), ds), temperature=1.7)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert not np.allclose(want, probabilities(logits_of(ckpt.build_model(), ds), temperature=1.0), atol=1e-3)

    # labels would not have changed anything: the labelled site gives the same table
    labelled, _ = predict(ckpt, synth_root / "hospital_b")
    np.testing.assert_allclose(labelled[["p_negative", "p_positive"]].to_numpy(), probs, atol=1e-5)


def test_predict_images_folder_and_table(ckpt_path, synth_root, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    images, info = predict(ckpt, synth_root / "hospital_c" / "images")
    n_files = len(list((synth_root / "hospital_c" / "images").glob("*.dcm")))
    assert info["input"] == "images" and len(images) == n_files > 10
    assert (images["has_record"] == 0).all() and (images["has_image"] == 1).all()
    assert images["patient_id"].str.endswith(".dcm").all()

    table_path = tmp_path / "records.csv"
    pd.read_csv(synth_root / "hospital_c" / "records.csv", dtype=str).drop(columns=["label"]).to_csv(
        table_path, index=False)
    table, info = predict(ckpt, table_path)
    assert info["input"] == "table" and "image" not in table.columns
    assert (table["has_image"] == 0).all() and (table["has_record"] == 1).all()
    # a missing modality changes the prediction, as in training
    both, _ = predict(ckpt, synth_root / "hospital_c")
    merged = both[both["image"] != ""].merge(table, on="patient_id", suffixes=("", "_rec"))
    assert np.abs(merged["p_positive"] - merged["p_positive_rec"]).max() > 1e-3


def test_predict_refuses_data_that_does_not_fit(ckpt_path, synth_root, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    table = tmp_path / "records.csv"
    pd.read_csv(synth_root / "hospital_a" / "records.csv", dtype=str).drop(columns=["crp", "sex"]).to_csv(
        table, index=False)
    with pytest.raises(DataMismatch, match=r"lacks the model's record column\(s\) \['crp', 'sex'\]"):
        predict(ckpt, table)
    rgb = tmp_path / "photos"
    rgb.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(rgb / f"p{i}.png")
    with pytest.raises(DataMismatch, match="1-channel images; of 3 images 3 with 3 channel"):
        predict(ckpt, rgb)


def test_federated_model_encodes_records_like_a_site(ckpt_path, synth_root, tmp_path):
    """No encoder in the checkpoint: fitted on --reference's training split, else on the input."""
    import torch

    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    fed = tmp_path / "best_model.pt"
    torch.save({k: v for k, v in raw.items() if k != "encoder"}, fed)
    ckpt = load_checkpoint(fed)
    assert ckpt.encoder is None and ckpt.record_encoder() is None
    site = synth_root / "hospital_b"
    own, info = predict(ckpt, site)
    ref, ref_info = predict(ckpt, site, reference=synth_root / "hospital_a")
    assert info["record_encoder"] == "input" and ref_info["record_encoder"] == "reference"
    # hospital_a's training statistics are those the checkpoint was trained with: same numbers
    stored, _ = predict(load_checkpoint(ckpt_path), site)
    np.testing.assert_allclose(ref["p_positive"], stored["p_positive"], atol=1e-5)
    assert np.abs(own["p_positive"] - stored["p_positive"]).max() > 1e-4
