"""``fedmed data check``: every bad case of issue 15 exits non-zero naming file/column/lines.

Each case breaks one real site folder (PNG images, a real DICOM written by pydicom) the way
the issue saw it, runs the real CLI, and checks the message: the file and the line or
column are named; no id, cell value, image file name or absolute path appears.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate

from fedmed.cli import main

RAMP = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 10)


def _tables(make_site):
    site = make_site("base")
    return (pd.read_csv(site / "records.csv", dtype=str, keep_default_na=False),
            pd.read_csv(site / "images.csv", dtype=str, keep_default_na=False))


def _config(tmp_path, data_cfg, site: str, **extra) -> str:
    data = data_cfg.model_dump(mode="json")
    data.update(root=str(tmp_path), sites=[site], **extra)
    path = tmp_path / f"{site}.yaml"
    path.write_text(yaml.safe_dump({"name": "check", "data": data}))
    return str(path)


def _dicom_case(kind):
    """Put a broken DICOM at images.csv line 4 (row 2) as images/scan_SECRET.dcm."""
    def build(site, images, dicom_file):
        good = dicom_file(site / "images" / "good_SECRET.dcm", RAMP)
        bad = site / "images" / "scan_SECRET.dcm"
        if kind == "truncated":
            bad.write_bytes(good.read_bytes()[:-60])
        elif kind == "text":
            bad.write_text("patient SECRET-0002, see report\n")
        elif kind == "no-pixels":
            ds = pydicom.dcmread(good)
            del ds.PixelData
            ds.save_as(bad, enforce_file_format=True)
        elif kind == "codec":  # MPEG-2 video: pydicom has no pixel decoder for it
            ds = pydicom.dcmread(good)
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
            ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
            ds["PixelData"].VR = "OB"
            ds.save_as(bad, enforce_file_format=False)
        images.loc[2, "image"] = "images/scan_SECRET.dcm"
        return images
    return build


IMAGE_CASES = [
    ("truncated-dicom", "truncated", "truncated"),
    ("text-named-dcm", "text", "not a DICOM file"),
    ("dicom-without-pixels", "no-pixels", "no pixel data"),
    ("undecodable-codec", "codec", "no decoder for transfer syntax"),
]


@pytest.mark.parametrize("kind, reason", [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_check_decodes_every_image(make_site, data_cfg, dicom_file, tmp_path, capsys, kind, reason):
    records, images = _tables(make_site)
    site = make_site("img", records=records, images=images)
    images = _dicom_case(kind)(site, images.copy(), dicom_file)
    images.to_csv(site / "images.csv", index=False)
    code = main(["data", "check", "--config", _config(tmp_path, data_cfg, "img")])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0, text
    assert "images.csv: 1 image(s) cannot be used" in text and reason in text and "line 4" in text
    assert "ERROR" in text and "SECRET" not in text and str(tmp_path) not in text, text


def _set(table, row, col, value):
    def edit(r, i):
        t = (r if table == "records" else i).copy()
        t.loc[row, col] = value
        return (t, i) if table == "records" else (r, t)
    return edit


TABLE_CASES = [
    ("header-only-records", lambda r, i: (r.iloc[:0], i),
     ["records.csv: the table has a header but no data rows"]),
    ("one-class-site", lambda r, i: (r.assign(label="benign"), i.assign(label="benign")),
     ["all 51 sample(s) are class 'benign'", "one-class site"]),
    ("three-patients", lambda r, i: (r.iloc[:3], i[i["patient_id"].isin(r["patient_id"].iloc[:3])]),
     ["3 patient(s), too few for data.val_fraction 0.2"]),
    ("negative-age", _set("records", 5, "age", "-4"),
     ["records.csv", "'age'", "outside data.ranges [0, 120]", "line 7"]),
    ("huge-value", _set("records", 9, "bp", "1e308"),
     ["records.csv", "'bp'", "beyond +-1e+09", "line 11"]),
    ("scientific-id", lambda r, i: (r.assign(patient_id=[f"1.2345E+{k + 10}" if k == 3 else p
                                                          for k, p in enumerate(r["patient_id"])]), i),
     ["records.csv", "scientific notation", "line 5"]),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in TABLE_CASES], ids=[c[0] for c in TABLE_CASES])
def test_check_refuses_silent_nonsense(make_site, data_cfg, tmp_path, capsys, secret, edit, expected):
    records, images = edit(*_tables(make_site))
    make_site("bad", records=records, images=images)
    code = main(["data", "check", "--config", _config(tmp_path, data_cfg, "bad")])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0, text
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    for value in (secret, "-4", "1e308", "1.2345E", str(tmp_path)):
        assert value not in text, f"{value!r} leaked:\n{text}"


def test_check_passes_a_good_site_and_reuses_the_cache(make_site, data_cfg, tmp_path, capsys):
    records, images = _tables(make_site)
    old = records.loc[0, "patient_id"]
    records.loc[0, "patient_id"] = "NA"  # a real id "NA" stays an id
    images.loc[images["patient_id"] == old, "patient_id"] = "NA"
    make_site("good", records=records, images=images)
    cfg = _config(tmp_path, data_cfg, "good")
    assert main(["data", "check", "--config", cfg]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 site(s) ok" in text and " 47 " in text  # 47 images decoded
    cached = list((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 47
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert main(["data", "check", "--config", cfg]) == 0  # second run: served from the cache
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


def test_training_refuses_the_same(make_site, data_cfg, tmp_path, capsys):
    records, images = _tables(make_site)
    make_site("tiny", records=records.iloc[:3],
              images=images[images["patient_id"].isin(records["patient_id"].iloc[:3])])
    code = main(["train-local", "--config", _config(tmp_path, data_cfg, "tiny"), "--site", "tiny",
                 "model.variant=record", "train.epochs=1", "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "too few for data.val_fraction" in err
