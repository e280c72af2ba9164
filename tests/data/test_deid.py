"""De-identification: no planted identifier survives, pseudonyms stable, joins kept.

The acceptance test plants unique identifiers at every nesting level of real pydicom-data
files (several modalities and transfer syntaxes) and greps the de-identified bytes for each,
in every encoding it could take.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fedmed.cli import main as fedmed_main
from fedmed.data.deid import ACTIONS, deidentify_dicom, deidentify_site, pseudonym
from fedmed.data.scrub import scrub_text

SALT = b"0123456789abcdef-site-secret"

# (file, what it adds to the mix)
FILES = [
    ("CT_small.dcm", "CT, explicit VR little endian, private tags, TIFF bytes in the preamble"),
    ("MR_small_implicit.dcm", "MR, implicit VR little endian"),
    ("MR_small_bigendian.dcm", "MR, explicit VR big endian"),
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", "MR with real overlay planes and Siemens private data"),
    ("JPEG2000.dcm", "NM, JPEG 2000 (encapsulated pixel data)"),
    ("JPGExtended.dcm", "NM, JPEG extended"),
    ("emri_small_jpeg_ls_lossless.dcm", "MR, JPEG-LS lossless, multi-frame"),
    ("SC_rgb_rle.dcm", "secondary capture RGB, RLE"),
    ("OBXXXX1A_rle.dcm", "US, RLE, private tags"),
    ("image_dfl.dcm", "deflated explicit VR little endian"),
    ("explicit_VR-UN.dcm", "CT, JPEG 2000, elements stored with VR UN"),
    ("liver_1frame.dcm", "SEG, functional group sequences"),
    ("test-SR.dcm", "structured report (content sequence)"),
    ("rtplan.dcm", "RT plan, no pixel data"),
]

_counter = itertools.count()


def _token(kind: str) -> str:
    return f"QZX{next(_counter):04d}{kind}"


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for kw, v in values.items():
        setattr(ds, kw, v)
    return ds


def plant(ds: pydicom.FileDataset) -> list[str]:
    """Put unique identifiers everywhere an identifier can hide; returns what must vanish."""
    secrets: list[str] = []

    def s(kind: str) -> str:
        secrets.append(t := _token(kind))
        return t

    def uid() -> str:
        secrets.append(u := f"1.2.826.0.1.3680043.9.7777.{next(_counter)}.{np.random.randint(1e9)}")
        return u

    def date() -> str:
        # unique, valid dates far from anything in the files (the 1900s are never used there)
        n = next(_counter)
        secrets.append(d := f"19{n % 100:02d}{1 + n % 12:02d}{1 + n % 28:02d}")
        return d

    # the file's own identifying UIDs and ids
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        if ds.get(kw):
            secrets.append(str(ds.get(kw)))
    # top level: the attributes the issue lists, and the common ones
    ds.PatientName = f"{s('FAM')}^{s('GIVEN')}"
    ds.PatientID = s("MRN")
    ds.OtherPatientIDs = s("OTHERID")
    ds.PatientBirthName = s("BIRTHNAME")
    ds.PatientBirthDate = date()
    ds.PatientAge = f"{100 + next(_counter) % 800:03d}D"  # an age no file carries
    secrets.append(ds.PatientAge)
    ds.PatientSize = f"1.{next(_counter) + 10000:05d}"
    secrets.append(str(ds.PatientSize))
    ds.PatientWeight = f"7{next(_counter) + 10000:05d}"
    secrets.append(str(ds.PatientWeight))
    ds.MedicalAlerts = s("ALERT")
    ds.CountryOfResidence = s("COUNTRY")
    ds.PatientAddress = s("ADDRESS")
    ds.PatientTelephoneNumbers = s("PHONE")
    ds.AdditionalPatientHistory = s("HISTORY")
    ds.PerformedProcedureStepStartDate = date()
    ds.PerformedProcedureStepEndDate = date()
    ds.PerformedProcedureStepDescription = s("PPSDESC")
    ds.CommentsOnThePerformedProcedureStep = s("PPSCOMMENT")
    ds.InstanceCreatorUID = uid()
    ds.StudyDate = date()
    ds.AccessionNumber = s("ACC")
    ds.InstitutionName = s("HOSPITAL")
    ds.ReferringPhysicianName = s("REFDOC")
    ds.OperatorsName = s("OPERATOR")
    ds.StudyDescription = s("STUDYDESC")
    ds.SeriesDescription = s("SERIESDESC")
    ds.ImageComments = s("IMGCOMMENT")
    ds.StationName = s("STATION")
    ds.DeviceSerialNumber = s("SERIAL")
    # removed sequences (X), with identifiers one and two levels down
    ds.ReferencedPatientSequence = Sequence([_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1", ReferencedSOPInstanceUID=uid(),
        PatientName=s("REFPATNAME"))])
    ds.RequestAttributesSequence = Sequence([_item(
        RequestedProcedureID=s("REQID"), ScheduledProcedureStepDescription=s("SPSDESC"),
        ScheduledProtocolCodeSequence=Sequence([_item(CodeValue="1", CodeMeaning=s("PROTO"),
                                                      CodingSchemeDesignator="L")]))])
    # kept sequences (K / U*): cleaned item by item, at depth 1, 2 and 3
    ds.ReferencedImageSequence = Sequence([_item(
        ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID=uid())])
    ds.AnatomicRegionSequence = Sequence([_item(
        CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest",
        PatientName=s("NESTEDNAME"), PatientID=s("NESTEDID"), MedicalAlerts=s("NESTEDALERT"),
        AnatomicRegionModifierSequence=Sequence([_item(
            CodeValue="G-A101", CodingSchemeDesignator="SRT", CodeMeaning="Left",
            PatientBirthName=s("DEEPBIRTH"), InstanceCreatorUID=uid(),
            PerformedProcedureStepStartDate=date(),
            ReferencedSeriesSequence=Sequence([_item(
                SeriesInstanceUID=uid(), ReferencedInstanceSequence=Sequence([_item(
                    ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                    ReferencedSOPInstanceUID=uid(), PatientSize="1.99999",
                    OtherPatientNames=s("DEEPEST"))]))]))]))])
    secrets.append("1.99999")
    # private tags: a block, a private sequence, UN bytes in UTF-16
    block = ds.private_block(0x0011, s("CREATOR"), create=True)
    block.add_new(0x01, "LO", s("PRIVLO"))
    block.add_new(0x02, "SQ", Sequence([_item(PatientName=s("PRIVSEQNAME"))]))
    utf16 = s("PRIVUTF16")
    block.add_new(0x03, "UN", utf16.encode("utf-16-le"))
    # an even (public) group no dictionary knows
    ds.add_new(0x00420099, "LO", s("UNKNOWNPUBLIC"))
    # overlay planes (60xx) and curves (50xx)
    ds.add_new(0x60020010, "US", 8)
    ds.add_new(0x60020011, "US", 8)
    ds.add_new(0x60020022, "LO", s("OVERLAYDESC"))
    ds.add_new(0x60020040, "CS", "G")
    ds.add_new(0x60020050, "SS", [1, 1])
    ds.add_new(0x60020100, "US", 1)
    ds.add_new(0x60024000, "LT", s("OVERLAYCOMMENT"))
    ds.add_new(0x60023000, "OW", s("OVL").encode().ljust(16, b"\0"))
    ds.add_new(0x50000000 | 0x2500, "LO", s("CURVELABEL"))
    # after the pixel data: trailing padding
    ds.add_new(0xFFFCFFFC, "OB", (s("PADDING") + "-pad").encode() * 3)
    # file meta and preamble
    ds.file_meta.SourceApplicationEntityTitle = s("AE")
    ds.file_meta.PrivateInformationCreatorUID = uid()
    ds.file_meta.PrivateInformation = s("METAPRIV").encode().ljust(16, b"\0")
    secrets.append(str(ds.file_meta.MediaStorageSOPInstanceUID))
    ds.preamble = s("PREAMBLE").encode().ljust(128, b"\0")
    # a non-ASCII name where the file declares no other character set
    if not ds.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientMotherBirthName = f"Ñúñez-{s('UNICODE')}"
        secrets.append("Ñúñez")
    return secrets


def _encodings(secret: str) -> set[bytes]:
    forms = {secret, secret.upper(), secret.lower()}
    out: set[bytes] = set()
    for f in forms:
        for enc in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            try:
                out.add(f.encode(enc))
            except UnicodeEncodeError:
                pass
    return out


def _file_bytes(path: Path) -> bytes:
    """The file's bytes; for a deflated transfer syntax also the inflated data set."""
    raw = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    if meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian:
        end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # after the (0002,0000) group
        raw += zlib.decompress(raw[end:], -zlib.MAX_WBITS)
    return raw


def _leaks(data: bytes, secrets: list[str]) -> list[str]:
    return [s for s in secrets if any(b in data for b in _encodings(s))]


def test_no_planted_identifier_survives_in_any_test_file(tmp_path, capsys):
    """Acceptance: 0 of the planted identifiers left across all test files."""
    planted = files = 0
    left: dict[str, list[str]] = {}
    for name, _why in FILES:
        src = Path(get_testdata_file(name))
        ds = pydicom.dcmread(src)
        original_pixels = ds.get("PixelData")
        secrets = plant(ds)
        planted_file = tmp_path / "in" / name
        planted_file.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(planted_file, enforce_file_format=False)
        missing = [s for s in secrets if not _leaks(_file_bytes(planted_file), [s])]
        assert not missing, f"{name}: planting failed for {missing}"
        out = tmp_path / "out" / name
        res = deidentify_dicom(planted_file, out, salt=SALT, unlabelled="review")
        assert res.written, f"{name}: {res.review}"
        files += 1
        planted += len(secrets)
        leaked = _leaks(_file_bytes(out), secrets)
        if leaked:
            left[name] = leaked
        clean = pydicom.dcmread(out)  # still a valid file, with the same pixels
        assert clean.PatientID == pseudonym(ds.PatientID, SALT)
        assert clean.PatientIdentityRemoved == "YES" and str(clean.PatientName) == ""
        assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
        assert clean.preamble == b"\0" * 128
        assert not any(e.tag.is_private or (e.tag.group & 0xFF00) in (0x5000, 0x6000)
                       for e in clean.iterall())
        assert all(int(e.tag) <= 0x7FE00010 for e in clean)
        if original_pixels is not None:
            assert clean.PixelData == original_pixels, f"{name}: pixel data changed"
    total_left = sum(len(v) for v in left.values())
    with capsys.disabled():
        print(f"\nde-identification: planted {planted} identifiers in {files} files "
              f"({len(FILES)} pydicom-data files); left after de-identification: {total_left}")
    assert not left, f"identifiers survived: {left}"
    assert files == len(FILES) and planted > 60 * files


def test_kept_sequences_are_cleaned_and_uids_stay_consistent(tmp_path):
    a, b = (pydicom.dcmread(get_testdata_file("CT_small.dcm")) for _ in range(2))
    b.SOPInstanceUID = b.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    b.ReferencedImageSequence = Sequence([_item(ReferencedSOPClassUID=a.SOPClassUID,
                                                ReferencedSOPInstanceUID=a.SOPInstanceUID)])
    for ds, n in ((a, "a.dcm"), (b, "b.dcm")):
        ds.save_as(tmp_path / n)
        assert deidentify_dicom(tmp_path / n, tmp_path / f"clean-{n}", salt=SALT).written
    ca, cb = (pydicom.dcmread(tmp_path / f"clean-{n}") for n in ("a.dcm", "b.dcm"))
    assert ca.StudyInstanceUID == cb.StudyInstanceUID != a.StudyInstanceUID  # same study
    assert ca.SOPInstanceUID != cb.SOPInstanceUID
    # the reference in b still points at a, under a's new UID; the class UID is kept
    assert cb.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ca.SOPInstanceUID
    assert cb.ReferencedImageSequence[0].ReferencedSOPClassUID == a.SOPClassUID
    # another salt: other UIDs
    deidentify_dicom(tmp_path / "a.dcm", tmp_path / "other.dcm", salt=SALT + b"x")
    assert pydicom.dcmread(tmp_path / "other.dcm").StudyInstanceUID != ca.StudyInstanceUID


def test_the_action_table_is_the_standards():
    """Spot checks against PS3.15 Table E.1-1 (DICOM 2026c)."""
    from pydicom.datadict import tag_for_keyword

    expected = {"PatientName": "Z", "PatientBirthName": "X", "PatientAge": "X", "PatientSize": "X",
                "PatientWeight": "X", "MedicalAlerts": "X", "CountryOfResidence": "X",
                "PerformedProcedureStepDescription": "X", "PerformedProcedureStepStartDate": "X",
                "InstanceCreatorUID": "U", "ReferencedSOPInstanceUID": "U",
                "ReferencedPatientSequence": "X", "RequestAttributesSequence": "X",
                "DataSetTrailingPadding": "X", "SOPInstanceUID": "U", "StudyDate": "Z",
                "ReferencedImageSequence": "U*", "InstitutionName": "D"}
    assert {kw: ACTIONS.get(tag_for_keyword(kw)) for kw in expected} == expected
    assert len(ACTIONS) > 600


def _one_dicom_site(tmp_path: Path, specs: list[tuple[str, dict[str, str]]]) -> Path:
    site = tmp_path / "site"
    (site / "images").mkdir(parents=True)
    rows = []
    for k, (name, attrs) in enumerate(specs):
        ds = pydicom.dcmread(get_testdata_file(name))
        for kw, v in attrs.items():
            setattr(ds, kw, v)
        pid = f"MRN{k:04d}"
        ds.PatientID = pid
        ds.save_as(site / "images" / f"{pid}.dcm")
        rows.append({"image": f"images/{pid}.dcm", "patient_id": pid, "label": "a"})
    pd.DataFrame(rows).to_csv(site / "images.csv", index=False)
    return site


def test_burned_in_annotation_is_refused_and_listed(tmp_path, capsys):
    site = _one_dicom_site(tmp_path, [
        ("CT_small.dcm", {}),                                   # line 2: fine
        ("CT_small.dcm", {"BurnedInAnnotation": "YES"}),        # line 3: refused
        ("OBXXXX1A_rle.dcm", {}),                               # line 4: US, unlabelled
        ("OBXXXX1A_rle.dcm", {"BurnedInAnnotation": "NO"}),     # line 5: US, says NO
        ("CT_small.dcm", {"RecognizableVisualFeatures": "YES"}),  # line 6: refused
    ])
    out = tmp_path / "out"
    assert fedmed_main(["data", "deidentify", str(site), "--out", str(out),
                        "--salt-file", str(tmp_path / "salt")]) == 0
    printed = capsys.readouterr().out
    assert "3 image(s) refused" in printed and "review.csv" in printed
    review = pd.read_csv(out / "review.csv")
    assert list(review["line"]) == [3, 4, 6] and set(review["status"]) == {"refused"}
    assert "BurnedInAnnotation is YES" in review.loc[0, "reason"]
    assert "MRN" not in (out / "review.csv").read_text()
    written = pd.read_csv(out / "images.csv")
    assert len(written) == 2 and len(list((out / "images").iterdir())) == 2
    # the site may choose to write unlabelled US images and review them: listed, not silent
    out2 = tmp_path / "out2"
    assert fedmed_main(["data", "deidentify", str(site), "--out", str(out2), "--salt-file",
                        str(tmp_path / "salt"), "--unlabelled-burned-in", "review"]) == 0
    review = pd.read_csv(out2 / "review.csv")
    assert list(review["line"]) == [3, 4, 6]
    assert list(review["status"]) == ["refused", "written", "refused"]
    assert len(pd.read_csv(out2 / "images.csv")) == 3


def test_site_is_deidentified_and_joins_survive(synth_root, tmp_path):
    src = synth_root / "hospital_c"
    counts = deidentify_site(src, tmp_path / "out", salt=SALT, notes="drop")
    assert counts["dicom"] == counts["images"] > 0 and counts["refused"] == 0
    records = pd.read_csv(src / "records.csv", dtype=str)
    images = pd.read_csv(src / "images.csv", dtype=str)
    new_rec = pd.read_csv(tmp_path / "out" / "records.csv", dtype=str)
    new_img = pd.read_csv(tmp_path / "out" / "images.csv", dtype=str)
    assert list(new_rec["patient_id"]) == [pseudonym(p, SALT) for p in records["patient_id"]]
    assert "notes" in records.columns and "notes" not in new_rec.columns
    # joins between images and records are kept
    assert set(new_img["patient_id"]) & set(new_rec["patient_id"])
    originals = set(records["patient_id"]) | set(images["patient_id"])
    for row in new_img.head(3).itertuples():
        ds = pydicom.dcmread(tmp_path / "out" / row.image)
        before = pydicom.dcmread(src / images.loc[row.Index, "image"])
        assert ds.PatientID == row.patient_id and ds.PatientID not in originals
        assert str(ds.PatientName) == "" and ds.get("StudyDate", "") == ""
        assert ds.StudyInstanceUID != before.StudyInstanceUID
        assert ds.PatientIdentityRemoved == "YES"
        np.testing.assert_array_equal(ds.pixel_array, before.pixel_array)
        assert not any(o in str(row.image) for o in originals)


def test_same_salt_same_pseudonym_other_salt_other():
    assert pseudonym("MRN-1", SALT) == pseudonym("MRN-1", SALT)
    assert pseudonym("MRN-1", SALT) != pseudonym("MRN-1", SALT + b"x")


def _notes_site(tmp_path: Path) -> tuple[Path, list[str]]:
    site = _one_dicom_site(tmp_path, [("CT_small.dcm", {"PatientName": "Quixano^Berenice"})])
    notes = ["Berenice Quixano (MRN0000) seen 03/04/2021, call +1 617-555-0142; "
             "Dr. Okonkwo asks for CT. cough for 7 days"]
    pd.DataFrame({"patient_id": ["MRN0000"], "label": ["a"], "age": [61],
                  "notes": notes}).to_csv(site / "records.csv", index=False)
    return site, ["Berenice", "Quixano", "MRN0000", "03/04/2021", "617-555-0142", "Okonkwo"]


def test_notes_need_an_explicit_choice(tmp_path, capsys):
    site, _ = _notes_site(tmp_path)
    out = tmp_path / "out"
    assert fedmed_main(["data", "deidentify", str(site), "--out", str(out),
                        "--salt-file", str(tmp_path / "salt")]) == 2
    err = capsys.readouterr().err
    assert "--notes drop|scrub|keep" in err and "'notes'" in err
    assert not out.exists()  # nothing written without the choice


@pytest.mark.parametrize("choice", ["drop", "scrub", "keep"])
def test_notes_choices(tmp_path, choice):
    site, secrets = _notes_site(tmp_path)
    out = tmp_path / "out"
    assert fedmed_main(["data", "deidentify", str(site), "--out", str(out), "--salt-file",
                        str(tmp_path / "salt"), "--notes", choice]) == 0
    data = (out / "records.csv").read_text()
    new = pd.read_csv(out / "records.csv")
    if choice == "drop":
        assert "notes" not in new.columns
    if choice in ("drop", "scrub"):
        assert [s for s in secrets if s in data] == []
    if choice == "scrub":  # the clinical content stays
        assert "cough for 7 days" in new.loc[0, "notes"] and "[NAME]" in new.loc[0, "notes"]
    if choice == "keep":
        assert all(s in data for s in secrets)


@pytest.mark.parametrize("text, known, gone, kept", [
    ("Pt Jane Roe, DOB 1961-02-03, tel (617) 555-0199", {"Jane", "Roe"},
     ["Jane", "Roe", "1961-02-03", "555-0199"], ["Pt", "DOB"]),
    ("seen 12 March 2020 by Mrs Patel; mail jr@example.org", set(),
     ["12 March 2020", "Patel", "jr@example.org"], ["seen"]),
    ("MRN 004512 38 years, crp 12.5 mg/l", {"004512"}, ["004512"], ["38 years", "12.5"]),
    ("id A77-1 and +44 20 7946 0958 (home)", {"A77-1"}, ["A77-1", "7946"], ["(home)"]),
])
def test_scrub_text(text, known, gone, kept):
    out = scrub_text(text, known=known)
    assert [g for g in gone if g in out] == [] and all(k in out for k in kept), out


def test_unparseable_trailing_bytes_and_corrupt_files_are_refused_not_copied(tmp_path):
    """Bytes after the data set never reach the copy (dropped, or the file is refused), and a
    corrupt file is refused and listed by line, without its name."""
    site = _one_dicom_site(tmp_path, [("CT_small.dcm", {}), ("MR_small.dcm", {})])
    first = site / "images" / "MRN0000.dcm"
    first.write_bytes(first.read_bytes() + b"QZXJUNKMRN0000-after-the-data-set")
    (site / "images" / "MRN0001.dcm").write_bytes(b"DICM" + b"MRN0001" * 20)
    out = tmp_path / "out"
    counts = deidentify_site(site, out, salt=SALT)
    assert counts["refused"] == 1 and counts["images"] == 1  # pydicom stops at the junk
    review = pd.read_csv(out / "review.csv")
    assert list(review["line"]) == [3] and "not a readable DICOM file" in review.loc[0, "reason"]
    assert "MRN" not in (out / "review.csv").read_text()
    leftovers = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"QZXJUNK" not in leftovers and b"MRN0000" not in leftovers


def test_an_id_that_reads_like_missing_stays_an_id(tmp_path):
    """A patient id "NA" is pseudonymised like any other id, never read as a missing value."""
    site = tmp_path / "site"
    site.mkdir()
    pd.DataFrame({"patient_id": ["NA", "P1"], "label": ["a", "b"], "age": ["61", ""]}).to_csv(
        site / "records.csv", index=False)
    deidentify_site(site, tmp_path / "out", salt=SALT)
    out = pd.read_csv(tmp_path / "out" / "records.csv", dtype=str, keep_default_na=False)
    assert list(out["patient_id"]) == [pseudonym("NA", SALT), pseudonym("P1", SALT)]
