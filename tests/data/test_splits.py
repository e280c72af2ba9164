"""fedmed.data.splits: patient-level, stratified, deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmed.data.splits import split_patients


def _samples(n_patients: int = 60, *, sites: int = 1, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-3 samples each; about a quarter positive; optional sites."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(p % 4 == 0)
        for _ in range(rng.integers(1, 4)):
            rows.append({"patient_id": f"p{p}", "label": label, "site": f"s{p % sites}"})
    df = pd.DataFrame(rows)
    return df if sites > 1 else df.drop(columns="site")


def _patients(df: pd.DataFrame, pos: np.ndarray) -> set[str]:
    return set(df["patient_id"].iloc[pos])


@pytest.mark.parametrize("n, sites, val, test", [(60, 1, 0.15, 0.2), (90, 3, 0.2, 0.2),
                                                 (200, 1, 0.1, 0.3)])
def test_patient_level_partition(n, sites, val, test):
    df = _samples(n, sites=sites)
    idx = split_patients(df, val_fraction=val, test_fraction=test, seed=0)
    assert set(idx) == {"train", "val", "test"}
    allpos = np.concatenate(list(idx.values()))
    assert sorted(allpos.tolist()) == list(range(len(df)))  # every row exactly once
    sides = [_patients(df, idx[k]) for k in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    n_test = len(sides[2]) / n
    assert abs(n_test - test) < 0.1 and abs(len(sides[1]) / n - val) < 0.1


def test_stratified_by_label():
    df = _samples(200)
    idx = split_patients(df, val_fraction=0.15, test_fraction=0.2, seed=3)
    overall = df["label"].mean()
    for pos in idx.values():
        assert abs(df["label"].iloc[pos].mean() - overall) < 0.08


def test_every_site_on_every_side():
    df = _samples(90, sites=3)
    idx = split_patients(df, val_fraction=0.15, test_fraction=0.2, seed=1)
    for pos in idx.values():
        part = df.iloc[pos]
        assert set(part["site"]) == {"s0", "s1", "s2"}
        assert set(zip(part["site"], part["label"], strict=True)) == set(zip(df["site"], df["label"], strict=True))


def test_deterministic_for_a_seed():
    df = _samples(80)
    a = split_patients(df, val_fraction=0.15, test_fraction=0.2, seed=7)
    b = split_patients(df, val_fraction=0.15, test_fraction=0.2, seed=7)
    c = split_patients(df, val_fraction=0.15, test_fraction=0.2, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_rare_class_still_splits():
    df = _samples(40)
    df.loc[df["patient_id"] == "p1", "label"] = 2  # one patient of class 2
    with pytest.warns(UserWarning, match="too few patients"):
        idx = split_patients(df, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert sum(len(v) for v in idx.values()) == len(df)


def test_too_few_patients_falls_back_then_fails():
    df = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "label": [0, 0, 1, 0]})
    with pytest.warns(UserWarning) as caught:
        idx = split_patients(df, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert any("unstratified" in str(w.message) for w in caught)
    assert all(len(v) for v in idx.values())
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="at least 2 patients"):
        split_patients(df.iloc[:2], val_fraction=0.2, test_fraction=0.2, seed=0)


@pytest.mark.parametrize("val, test", [(0.0, 0.2), (0.6, 0.5), (0.2, 1.0)])
def test_bad_fractions(val, test):
    with pytest.raises(ValueError):
        split_patients(_samples(10), val_fraction=val, test_fraction=test, seed=0)
