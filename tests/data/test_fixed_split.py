"""data.split_column: a study's fixed train/val/test sides, and the errors that name lines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmed.data.dataset import build_splits
from fedmed.data.site import SiteDataError, load_site


def _tables(make_site):
    site = make_site("base")
    return (pd.read_csv(site / "records.csv", dtype=str, keep_default_na=False),
            pd.read_csv(site / "images.csv", dtype=str, keep_default_na=False))


def _sides(n: int) -> list[str]:
    return ["test" if i % 4 == 0 else "train" for i in range(n)]


def test_split_in_records_decides_the_sides(make_site, data_cfg):
    records, images = _tables(make_site)
    records["fold"] = _sides(len(records))
    images = images[~images["patient_id"].str.contains("IMG")]  # image-only patients have no record
    cfg = data_cfg.model_copy(update={"split_column": "fold"})
    site = load_site(make_site("fixed", records=records, images=images), cfg)
    splits = build_splits(site, cfg)
    s = site.samples
    want_test = set(records.loc[records["fold"] == "test", "patient_id"])
    assert set(s["patient_id"].iloc[splits.indices["test"]]) == want_test
    train = set(s["patient_id"].iloc[splits.indices["train"]])
    val = set(s["patient_id"].iloc[splits.indices["val"]])
    assert val and not (train & val) and not ((train | val) & want_test)
    # val is carved from the train side only; the same seed gives the same val
    assert np.array_equal(build_splits(site, cfg).indices["val"], splits.indices["val"])


def test_split_in_images_and_explicit_val(make_site, data_cfg):
    records, images = _tables(make_site)
    side = dict(zip(records["patient_id"], ["val" if i % 5 == 1 else s
                                            for i, s in enumerate(_sides(len(records)))], strict=True))
    images["fold"] = [side.get(p, "train") for p in images["patient_id"]]
    keep = records["patient_id"].isin(images["patient_id"])
    cfg = data_cfg.model_copy(update={"split_column": "fold"})
    site = load_site(make_site("img", records=records[keep], images=images), cfg)
    idx = build_splits(site, cfg).indices
    assert {k: len(v) for k, v in idx.items()} == {
        k: int((images["fold"] == k).sum()) for k in ("train", "val", "test")}


def _two_sides(r, i):
    i = i.copy()
    first = i.index[i["patient_id"] == r.loc[0, "patient_id"]]  # patient 0 has two images
    i["fold"] = "train"
    i.loc[first[1], "fold"] = "test"
    return r[r["patient_id"].isin(i["patient_id"])], i


def _records_fold(values):
    def edit(r, i):
        r = r.copy()
        r["fold"] = _sides(len(r))
        for row, v in values.items():
            r.loc[row, "fold"] = v
        return r, i[~i["patient_id"].str.contains("IMG")]
    return edit


CASES = [
    ("patient-on-two-sides", _two_sides,
     ["images.csv", "1 patient(s) have images on more than one side", "'fold'", "lines 2, 3"]),
    ("unknown-value", _records_fold({3: "holdout"}),
     ["records.csv", "1 value(s) that are not one of ['train', 'val', 'test']", "line 5"]),
    ("empty-cell", _records_fold({6: ""}), ["records.csv", "'fold' is empty on 1 row(s)", "line 8"]),
    ("empty-test-side", _records_fold({k: "train" for k in range(0, 40, 4)}),
     ["split column 'fold' leaves the test side(s) empty", "test: 0"]),
    ("column-absent", lambda r, i: (r, i), ["data.split_column 'fold' is set", "no such column"]),
    ("record-only-without-side", lambda r, i: (r, i.assign(fold="train")),
     ["records.csv", "4 record-only patient(s) have no side", "lines 38, 39, 40, 41"]),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_split_errors_name_lines_never_values(make_site, data_cfg, secret, edit, expected):
    records, images = edit(*_tables(make_site))
    cfg = data_cfg.model_copy(update={"split_column": "fold"})
    with pytest.raises(SiteDataError) as err:
        load_site(make_site("bad", records=records, images=images), cfg)
    msg = str(err.value)
    for fragment in expected:
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"
    assert secret not in msg and "holdout" not in msg
