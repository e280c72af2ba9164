"""Patient-level, label-stratified train/val/test splits.

A patient's samples (several images of one lesion, follow-up X-rays with different findings)
always land on one side, otherwise test scores leak: a model that recalls the person scores
on their other images. Labels are per sample, so a patient can carry a mix of labels;
StratifiedGroupKFold balances each fold on the groups' label *mix* (it counts every
patient's samples per class), which is the stratification wanted here. Stratifying on
(site, label) keeps every site and class on every side where the counts allow it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from fedmed.errors import UsageError

__all__ = ["split_patients", "fixed_splits", "SPLIT_NAMES"]

SPLIT_NAMES = ("train", "val", "test")


def _strata(samples: pd.DataFrame) -> np.ndarray:
    label = samples["label"].astype(str)
    if "site" in samples.columns and samples["site"].nunique() > 1:
        label = samples["site"].astype(str) + "|" + label
    return label.to_numpy()


def _hold_out(
    y: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (keep, held) with about ``fraction`` of the groups held out."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise UsageError(f"cannot split off a {what} set: need at least 2 patients, "
                         f"found {n_groups}")
    n_splits = max(2, int(round(1.0 / fraction)))
    if n_splits <= n_groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class" noise
            sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            keep, held = next(sgkf.split(np.zeros(len(y)), y, groups))
        if len(held) and len(keep):
            return keep, held
    warnings.warn(f"{what} split: too few patients ({n_groups}) to stratify by label; "
                  "using an unstratified patient-level split", stacklevel=3)
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    return next(gss.split(np.zeros(len(y)), y, groups))


def _warn_rare(y: np.ndarray, groups: np.ndarray) -> None:
    per = pd.DataFrame({"y": y, "g": groups}).drop_duplicates().groupby("y")["g"].size()
    rare = per[per < 3]
    if len(rare):
        names = ", ".join(f"{k!r} ({int(v)} patient(s))" for k, v in rare.items())
        warnings.warn("too few patients to put these strata ([site|]label index) on all "
                      f"three sides: {names}", stacklevel=3)


def split_patients(
    samples: pd.DataFrame, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Row positions of ``samples`` for ``"train"``, ``"val"`` and ``"test"``.

    Groups are ``patient_id`` (a patient is never on two sides); strata are ``label``, or
    (``site``, ``label``) when several sites are present. Uses StratifiedGroupKFold
    (``n_splits ≈ 1/fraction``, one fold held out; then again for val on the rest) and falls
    back to GroupShuffleSplit with a warning when there are too few patients to stratify.
    Deterministic for a given ``seed``. Raises ValueError with fewer than 3 patients.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise UsageError(f"{name} must be in (0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise UsageError("val_fraction + test_fraction must be below 1")
    if len(samples) == 0:
        raise UsageError("cannot split an empty sample table")
    groups = samples["patient_id"].astype(str).to_numpy()
    y = _strata(samples)
    _warn_rare(y, groups)
    rest, test = _hold_out(y, groups, test_fraction, seed, "test")
    val_share = val_fraction / (1.0 - test_fraction)
    train_r, val_r = _hold_out(y[rest], groups[rest], val_share, seed + 1, "validation")
    out = {"train": rest[train_r], "val": rest[val_r], "test": test}
    return {k: np.sort(v).astype(np.int64) for k, v in out.items()}


def fixed_splits(samples: pd.DataFrame, *, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Row positions per side from the ``split`` column (a study's fixed split).

    The site loader has already checked that every patient has one side and that train and
    test are not empty. Without ``val`` rows, a patient-level, stratified ``val_fraction`` of
    the TRAIN patients becomes val (for early stopping: the test side is never looked at).
    """
    side = samples["split"].astype(str).to_numpy()
    out = {k: np.flatnonzero(side == k) for k in SPLIT_NAMES}
    if len(out["val"]) == 0:
        train = out["train"]
        sub = samples.iloc[train]
        keep, held = _hold_out(_strata(sub), sub["patient_id"].astype(str).to_numpy(),
                               val_fraction, seed + 1, "validation")
        out["train"], out["val"] = train[keep], train[held]
    return {k: np.sort(v).astype(np.int64) for k, v in out.items()}
