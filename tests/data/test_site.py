"""fedmed.data.site: loading a site folder, validation messages, pooling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmed.data.site import SAMPLE_COLUMNS, SiteDataError, combine_sites, load_site


def _tables(make_site):
    """The default tables, as written by ``make_site``."""
    site = make_site("base")
    return pd.read_csv(site / "records.csv", dtype=str), pd.read_csv(site / "images.csv",
                                                                     dtype=str)


def test_valid_site_loads(make_site, data_cfg):
    site = load_site(make_site(), data_cfg)
    s = site.samples
    assert list(s.columns) == SAMPLE_COLUMNS and site.name == "site_a"
    assert s["label"].dtype == np.int64 and s["has_image"].dtype == bool
    assert s.loc[s["has_image"], "image_path"].map(lambda p: p.startswith("/")).all()
    assert s.loc[~s["has_image"], "image_path"].isna().all()
    assert set(site.records.columns) == {"age", "bp", "sex", "smoker"}
    assert site.records.index.is_unique and site.records["age"].dtype == np.float64
    summ = site.summary
    # 36 patients with images (9 of them with two), 4 record-only, 2 image-only
    assert (summ.patients, summ.images, summ.samples) == (42, 47, 51)
    assert (summ.both, summ.image_only, summ.record_only) == (36, 2, 4)
    assert sum(summ.label_counts.values()) == 51 and list(summ.label_counts) == ["benign",
                                                                                 "malignant"]
    assert summ.missing_values["age"] == 2 and summ.unknown_categories["sex"] == 1
    table = summ.table()
    assert "record only" in table and "malignant" in table and "SECRET" not in table
    assert summ.as_dict()["samples"] == 51


def test_image_only_and_record_only_samples(make_site, data_cfg):
    s = load_site(make_site(), data_cfg).samples
    img_only = s[~s["has_record"]]
    rec_only = s[~s["has_image"]]
    assert len(img_only) == 2 and img_only["has_image"].all()
    assert img_only["label"].tolist() == [0, 1]  # their own labels from images.csv
    assert len(rec_only) == 4 and rec_only["has_record"].all()


def test_records_only_and_images_only_sites(make_site, data_cfg):
    rec = load_site(make_site("r", images=None), data_cfg)
    assert len(rec.samples) == 40 and not rec.samples["has_image"].any()
    _, images = _tables(make_site)
    images["label"] = "benign"
    img = load_site(make_site("i", records=None, images=images), data_cfg)
    assert len(img.samples) == 47 and not img.samples["has_record"].any()
    assert len(img.records) == 0 and img.summary.image_only == 38


def test_image_labels_are_per_image(make_site, data_cfg):
    """A patient's follow-up images may disagree with each other and with the records' label."""
    records, images = _tables(make_site)
    pid = records.loc[0, "patient_id"]  # patient 0 has two images, record label "malignant"
    rows = images.index[images["patient_id"] == pid]
    images.loc[rows, "label"] = ["benign", "malignant"]
    s = load_site(make_site("per_image", records=records, images=images), data_cfg).samples
    assert s.loc[s["patient_id"] == pid, "label"].tolist() == [0, 1]


def test_records_may_omit_label_when_images_carry_it(make_site, data_cfg):
    records, images = _tables(make_site)
    lookup = dict(zip(records["patient_id"], records["label"], strict=True))
    images["label"] = [lab or lookup[p] for p, lab in zip(images["patient_id"],
                                                          images["label"].fillna(""), strict=True)]
    keep = records["patient_id"].isin(images["patient_id"])  # drop the 4 record-only patients
    site = load_site(make_site("nolabel", records=records[keep].drop(columns="label"),
                               images=images), data_cfg)
    assert site.summary.samples == 47 and site.summary.record_only == 0
    assert "label" not in site.records.columns


def test_id_na_stays_an_id(make_site, data_cfg):
    records, images = _tables(make_site)
    old = records.loc[0, "patient_id"]
    records.loc[0, "patient_id"] = "NA"
    images.loc[images["patient_id"] == old, "patient_id"] = "NA"
    records.loc[1, "age"] = "NA"  # in a numeric column "NA" is a missing value
    site = load_site(make_site("na", records=records, images=images), data_cfg)
    assert "NA" in site.records.index and site.records.loc["NA"].notna().any()
    assert (site.samples["patient_id"] == "NA").sum() == 2
    assert np.isnan(site.records["age"].iloc[1])


def test_parquet_records(make_site, data_cfg):
    records, _ = _tables(make_site)
    site = load_site(make_site("pq", records=records, records_format="parquet"), data_cfg)
    assert site.summary.samples == 51


def _drop(col):
    return lambda r, i: (r.drop(columns=[col]), i)


def _set(table, row, col, value):
    def edit(r, i):
        t = (r if table == "records" else i).copy()
        t.loc[row, col] = value
        return (t, i) if table == "records" else (r, t)
    return edit


# (case id, edit(records, images) -> (records, images), expected fragments of the message)
ERROR_CASES = [
    ("missing-column", _drop("bp"), ["records.csv", "missing required column", "'bp'"]),
    ("missing-id-column", _drop("patient_id"), ["records.csv", "'patient_id'"]),
    ("extra-column", lambda r, i: (r.assign(ssn="x"), i),
     ["records.csv", "'ssn'", "data.ignore_columns"]),
    ("unknown-label", _set("records", 4, "label", "maybe"),
     ["records.csv", "'label'", "1 distinct value(s)", "line 6"]),
    ("empty-label-record-only", _set("records", 37, "label", ""),
     ["records.csv", "1 patient(s) have no 'label'", "no image", "line 39"]),
    ("empty-label-images-unlabelled", _set("records", 2, "label", ""),
     ["images.csv", "no 'label' and no record label", "line 5"]),
    ("duplicate-id", lambda r, i: (pd.concat([r, r.iloc[[7]]], ignore_index=True), i),
     ["records.csv", "'patient_id'", "more than one row", "lines 9, 42"]),
    ("non-numeric", _set("records", 0, "age", "sixty"), ["records.csv", "'age'", "line 2"]),
    ("missing-image-file", _set("images", 3, "image", "images/nowhere.png"),
     ["images.csv", "1 image file(s)", "do not exist", "line 5"]),
    ("image-without-label-or-record", _set("images", 45, "label", ""),
     ["images.csv", "no 'label' and no record label", "line 47"]),
    ("image-unknown-label", _set("images", 46, "label", "cat"), ["images.csv", "1 distinct value(s)", "line 48"]),
    ("image-extra-column", lambda r, i: (r, i.assign(width=1)), ["images.csv", "'width'"]),
    ("image-missing-column", lambda r, i: (r, i.drop(columns=["image"])),
     ["images.csv", "'image'"]),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors_name_file_and_column_never_ids(make_site, data_cfg, edit, expected, secret):
    records, images = edit(*_tables(make_site))
    site = make_site("bad", records=records, images=images, write_files=False)
    (site / "images").mkdir(exist_ok=True)
    for rel in images.get("image", pd.Series(dtype=str)):
        if "nowhere" not in rel:
            (site / rel).write_bytes(b"")
    with pytest.raises(SiteDataError) as err:
        load_site(site, data_cfg)
    msg = str(err.value)
    for fragment in expected:
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"
    assert secret not in msg
    # Never a cell value, an image file name or an absolute path.
    for value in ("maybe", "'cat'", "nowhere", str(site)):
        assert value not in msg, f"{value!r} leaked into:\n{msg}"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-file", "symlink-dir"])
def test_image_paths_stay_inside_the_site_folder(make_site, data_cfg, tmp_path, how):
    """A row that leads outside the site folder is refused with its line, unless allowed."""
    import os

    records, images = _tables(make_site)
    site = make_site("conf", records=records, images=images)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "other.png").write_bytes((site / images.loc[0, "image"]).read_bytes())
    if how == "dotdot":
        target = os.path.relpath(outside / "other.png", site)
    elif how == "absolute":
        target = str(outside / "other.png")
    elif how == "symlink-file":
        target = "images/link.png"
        (site / target).symlink_to(outside / "other.png")
    else:
        (site / "images" / "sub").symlink_to(outside, target_is_directory=True)
        target = "images/sub/other.png"
    images = images.copy()
    images.loc[1, "image"] = target
    images.to_csv(site / "images.csv", index=False)
    with pytest.raises(SiteDataError) as err:
        load_site(site, data_cfg)
    msg = str(err.value)
    assert "lead outside the site folder" in msg and "line 3" in msg and "image_roots" in msg, msg
    assert "other.png" not in msg and str(outside) not in msg
    # The site's config may allow that one outside folder explicitly.
    allowed = data_cfg.model_copy(update={"image_roots": [str(outside)]})
    assert load_site(site, allowed).summary.images == len(images)


def test_ignore_columns_allows_extra(make_site, data_cfg):
    records, images = _tables(make_site)
    site = make_site("x", records=records.assign(ssn="x"), images=images)
    with pytest.raises(SiteDataError):
        load_site(site, data_cfg)
    data_cfg.ignore_columns = ["ssn"]
    assert "ssn" not in load_site(site, data_cfg).records.columns


def test_all_problems_reported_together(make_site, data_cfg):
    records, images = _tables(make_site)
    records.loc[0, "age"] = "old"
    records.loc[1, "label"] = "maybe"
    site = make_site("multi", records=records.assign(extra=1), images=images)
    msg = str(pytest.raises(SiteDataError, load_site, site, data_cfg).value)
    assert "3 problem(s)" in msg and "'age'" in msg and "'label'" in msg and "'extra'" in msg
    assert "maybe" not in msg


def test_folder_errors(tmp_path, data_cfg):
    with pytest.raises(SiteDataError, match="site folder not found"):
        load_site(tmp_path / "nope", data_cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteDataError, match="no records.csv, records.parquet or images.csv"):
        load_site(tmp_path / "empty", data_cfg)


def test_notes_column_kept(make_site, data_cfg):
    records, images = _tables(make_site)
    records["notes"] = "smoker, mild cough"
    data_cfg.notes_column = "notes"
    site = load_site(make_site("n", records=records, images=images), data_cfg)
    assert site.records["notes"].iloc[0] == "smoker, mild cough"


def test_combine_sites(make_site, data_cfg):
    a = load_site(make_site("a"), data_cfg)
    b = load_site(make_site("b"), data_cfg)
    pooled = combine_sites([a, b])
    assert pooled.name == "pooled" and len(pooled.samples) == 102
    assert pooled.samples["patient_id"].str.match(r"^(a|b)/").all()
    assert pooled.records.index.is_unique and len(pooled.records) == 80
    assert set(pooled.samples["site"]) == {"a", "b"}
    assert pooled.summary.samples == 102 and pooled.summary.label_counts["benign"] == 66
    assert pooled.summary.unknown_categories["sex"] == 2
    with pytest.raises(ValueError, match="unique"):
        combine_sites([a, a])
