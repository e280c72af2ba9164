"""Local training end to end on the synthetic cohort: learning happens, both modalities help."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedmed.cli import main as fedmed_main
from fedmed.config import load_config
from fedmed.experiments.local import train_local


def test_fusion_learns_well_above_chance(synth_config, tmp_path):
    _, path = synth_config()
    cfg = load_config(path)
    res = train_local(cfg, sites=None, out_dir=tmp_path / "fusion")
    test = res["metrics"]["test"]
    # Chance is AUC 0.5 / balanced accuracy 0.5; the label needs image and record.
    assert test["auc"] > 0.75, test
    assert test["balanced_accuracy"] > 0.65, test
    saved = json.loads((tmp_path / "fusion" / "metrics.json").read_text())
    assert saved["metrics"]["test"]["auc"] == pytest.approx(test["auc"])
    assert (tmp_path / "fusion" / "model.pt").exists()


def test_missing_modality_path_trains(synth_config, synth_root, tmp_path):
    """A site whose records are gone for half its patients still trains and predicts."""
    site = tmp_path / "site"
    src = synth_root / "hospital_a"
    (site / "images").mkdir(parents=True)
    images = pd.read_csv(src / "images.csv")
    images["image"] = [str(src / p) for p in images["image"]]
    images.to_csv(site / "images.csv", index=False)
    records = pd.read_csv(src / "records.csv", dtype={"patient_id": str})
    records.iloc[: len(records) // 2].to_csv(site / "records.csv", index=False)
    _, path = synth_config(data={"root": str(tmp_path), "sites": ["site"], "image_roots": [str(src)]},
                           train={"epochs": 3})
    cfg = load_config(path)
    res = train_local(cfg, sites=["site"], out_dir=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["split_sizes"]["train"] > 0
    assert res["metrics"]["test"]["n"] > 0
    assert 0.0 <= res["metrics"]["test"]["accuracy"] <= 1.0


def test_cli_train_local_prints_table(synth_config, tmp_path, capsys):
    _, path = synth_config(train={"epochs": 1})
    code = fedmed_main(["train-local", "-c", str(path), "--site", "hospital_c",
                        "--out", str(tmp_path / "cli"), "model.variant=record"])
    assert code == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "hospital_c record test" in out


@pytest.mark.parametrize("override, needle", [
    ("train.epochz=3", "train.epochz: unknown key"),
    ("train.epochs=-1", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("model.variant=audio", "model.variant"),
])
def test_cli_rejects_bad_config_naming_key_and_file(synth_config, capsys, override, needle):
    _, path = synth_config()
    code = fedmed_main(["train-local", "-c", str(path), override])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and str(path) in err
