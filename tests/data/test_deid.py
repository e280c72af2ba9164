"""De-identification: identifying DICOM attributes gone, pseudonyms stable, joins kept."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom

from fedmed.cli import main as fedmed_main
from fedmed.data.deid import deidentify_site, pseudonym

SALT = b"0123456789abcdef-site-secret"


def test_site_is_deidentified_and_joins_survive(synth_root, tmp_path):
    src = synth_root / "hospital_c"
    counts = deidentify_site(src, tmp_path / "out", salt=SALT)
    assert counts["dicom"] == counts["images"] > 0
    records = pd.read_csv(src / "records.csv", dtype=str)
    images = pd.read_csv(src / "images.csv", dtype=str)
    new_rec = pd.read_csv(tmp_path / "out" / "records.csv", dtype=str)
    new_img = pd.read_csv(tmp_path / "out" / "images.csv", dtype=str)
    assert list(new_rec["patient_id"]) == [pseudonym(p, SALT) for p in records["patient_id"]]
    # joins between images and records are kept
    assert set(new_img["patient_id"]) & set(new_rec["patient_id"])
    originals = set(records["patient_id"]) | set(images["patient_id"])
    for row in new_img.itertuples():
        ds = pydicom.dcmread(tmp_path / "out" / row.image)
        before = pydicom.dcmread(src / images.loc[row.Index, "image"])
        assert ds.PatientID == row.patient_id and ds.PatientID not in originals
        assert str(ds.PatientName) == "" and ds.get("StudyDate", "") == ""
        assert ds.StudyInstanceUID != before.StudyInstanceUID
        assert ds.PatientIdentityRemoved == "YES"
        np.testing.assert_array_equal(ds.pixel_array, before.pixel_array)
        assert not any(o in str(row.image) for o in originals)
        break


def test_same_salt_same_pseudonym_other_salt_other():
    assert pseudonym("MRN-1", SALT) == pseudonym("MRN-1", SALT)
    assert pseudonym("MRN-1", SALT) != pseudonym("MRN-1", SALT + b"x")


def test_cli_creates_a_salt_and_writes_the_copy(synth_root, tmp_path, capsys):
    code = fedmed_main(["data", "deidentify", str(synth_root / "hospital_c"), "--out", str(tmp_path / "o"),
                        "--salt-file", str(tmp_path / "salt")])
    assert code == 0 and (tmp_path / "salt").stat().st_size == 32
    assert "pseudonyms" in capsys.readouterr().out
