"""fedmed evaluate: metrics with patient-level bootstrap CIs per site and pooled; refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmed.bootstrap import bootstrap_metrics, combine_site_intervals
from fedmed.checkpoint import load_checkpoint
from fedmed.evaluate import evaluate_model, load_eval_set
from fedmed.fit_check import DataMismatch
from fedmed.metrics import compute_metrics
from fedmed.predict import logits_of, probabilities

_spec = importlib.util.spec_from_file_location("export_tests", Path(__file__).with_name("test_export.py"))
_export_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_export_tests)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory, synth_root, cache_dir) -> Path:
    return _export_tests.trained_checkpoint(synth_root, tmp_path_factory.mktemp("evaluate"))


def test_bootstrap_resamples_patients_not_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 80), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    base = bootstrap_metrics(y, probs, groups=np.arange(80), n_boot=300, seed=3)
    # every patient imaged 4 times: a patient-level bootstrap gives the very same intervals...
    rep = np.repeat(np.arange(80), 4)
    same = bootstrap_metrics(y[rep], probs[rep], groups=rep, n_boot=300, seed=3)
    for k in ("accuracy", "auc", "sensitivity"):
        assert same[k]["lo"] == pytest.approx(base[k]["lo"]) and same[k]["hi"] == pytest.approx(base[k]["hi"])
        assert base[k]["lo"] < base[k]["value"] < base[k]["hi"]
    # ...while treating the 320 rows as independent would claim half the width
    rows = bootstrap_metrics(y[rep], probs[rep], groups=np.arange(320), n_boot=300, seed=3)
    assert rows["auc"]["hi"] - rows["auc"]["lo"] < 0.7 * (base["auc"]["hi"] - base["auc"]["lo"])


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_replicate_metrics_equal_sklearns(n_classes):
    """The bootstrap's numpy metrics are compute_metrics' (scikit-learn's) numbers, case by case:
    ties in the scores, classes absent from a replicate or never predicted, one class only."""
    from fedmed.bootstrap import _replicate_metrics

    rng = np.random.default_rng(n_classes)
    checked = 0
    for trial in range(60):
        n = int(rng.integers(3, 60))
        k = 1 if trial % 5 == 4 else int(rng.integers(2, n_classes + 1))  # only k classes occur
        y = rng.choice(rng.permutation(n_classes)[:k], n)
        probs = rng.dirichlet(np.ones(n_classes), n)
        if trial % 3 == 0:
            probs = np.round(probs, 1) + 1e-3  # ties
            probs /= probs.sum(axis=1, keepdims=True)
        ours, theirs = _replicate_metrics(y, probs, n_classes), compute_metrics(y, probs, n_classes=n_classes)
        for key, value in ours.items():
            assert value == pytest.approx(theirs[key], abs=1e-12, nan_ok=True), (trial, key)
        checked += int(np.isfinite(ours["auc"]))
    assert checked >= 40  # most trials had an AUC to compare


def test_combine_site_intervals_is_the_weighted_mean_with_independent_errors():
    pooled = combine_site_intervals({"a": {"auc": 0.8, "auc_se": 0.03, "num-examples": 100},
                                     "b": {"auc": 0.6, "auc_se": 0.04, "num-examples": 300},
                                     "c": {"num-examples": 50}}, keys=("auc",))
    assert pooled["auc"]["value"] == pytest.approx(0.65) and pooled["auc"]["sites"] == 2
    se = np.sqrt(0.25**2 * 0.03**2 + 0.75**2 * 0.04**2)
    assert pooled["auc"]["se"] == pytest.approx(se)
    assert pooled["auc"]["lo"] == pytest.approx(0.65 - 1.959964 * se)


def test_evaluate_sites_and_pool_with_cis(ckpt_path, synth_root, tmp_path, capsys):
    from fedmed.cli import main

    out = tmp_path / "eval"
    sites = [synth_root / "central", synth_root / "hospital_b"]
    assert main(["evaluate", str(ckpt_path), "--site-dir", str(sites[0]), "--site-dir", str(sites[1]),
                 "--bootstrap", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "central" in printed and "pooled" in printed and "[" in printed
    res = json.loads((out / "evaluation.json").read_text())
    assert res["split"] == "all" and res["temperature"] == pytest.approx(1.7) and res["temperature_fitted"]
    ckpt = load_checkpoint(ckpt_path)
    total = 0
    for site in sites:
        s = load_eval_set(ckpt, site)
        want = compute_metrics(s.labels, probabilities(logits_of(ckpt.build_model(), s.dataset), temperature=1.7))
        got = res["sites"][site.name]
        assert got["n_samples"] == len(s.labels) == want["n"]
        total += want["n"]
        assert got["record_encoder"] == "checkpoint"
        for k in ("accuracy", "auc", "balanced_accuracy", "ece"):
            m = got["metrics"][k]
            assert m["value"] == pytest.approx(want[k])
            assert m["lo"] <= m["value"] <= m["hi"] and m["hi"] - m["lo"] > 0.005
    assert res["pooled"]["n_samples"] == total
    assert "notes" in res["sites"]["central"]["ignored_columns"]  # the model does not use notes
    for name in ("central", "hospital_b", "pooled"):
        assert (out / f"roc_{name}.png").stat().st_size > 1000
        assert (out / f"reliability_{name}.png").stat().st_size > 1000
    assert "External validation" in (out / "evaluation.html").read_text()


def test_evaluate_test_split_is_the_sites_own(ckpt_path, synth_root):
    ckpt = load_checkpoint(ckpt_path)
    all_rows = load_eval_set(ckpt, synth_root / "hospital_b", split="all")
    test = load_eval_set(ckpt, synth_root / "hospital_b", split="test")
    assert 0.1 * len(all_rows.labels) < len(test.labels) < 0.35 * len(all_rows.labels)


@pytest.mark.parametrize("change, message", [
    ("label", r"label\(s\) \['maybe'\] that are not among the model's classes \['negative', 'positive'\]"),
    ("column", r"lacks the model's record column\(s\) \['spo2'\]"),
    ("channels", r"the model takes 1-channel images; of \d+ images 2 with 3 channel\(s\)"),
])
def test_evaluate_refuses_sites_that_do_not_fit(ckpt_path, synth_root, tmp_path, change, message):
    site = tmp_path / "odd_site"
    shutil.copytree(synth_root / "hospital_c", site)
    rec = pd.read_csv(site / "records.csv", dtype=str)
    if change == "label":
        rec.loc[rec.index[:3], "label"] = "maybe"
        img = pd.read_csv(site / "images.csv", dtype=str).drop(columns=["label"])
        img.to_csv(site / "images.csv", index=False)
    elif change == "column":
        rec = rec.drop(columns=["spo2"])
    else:  # two colour photographs among the DICOM images
        from PIL import Image

        img = pd.read_csv(site / "images.csv", dtype=str)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(site / f"photo{i}.png")
            img.loc[img.index[i], "image"] = f"photo{i}.png"
        img.to_csv(site / "images.csv", index=False)
    rec.to_csv(site / "records.csv", index=False)
    with pytest.raises(DataMismatch, match=message):
        evaluate_model(load_checkpoint(ckpt_path), [site], n_boot=10)
