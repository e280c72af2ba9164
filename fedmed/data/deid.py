"""De-identification of a site folder: DICOM basic profile + salted pseudonyms.

``fedmed data deidentify SITE_DIR --out DIR --salt-file SALT`` writes a copy of a site in
which every DICOM file has the identifying attributes of the DICOM PS3.15 Basic Application
Level Confidentiality Profile removed, emptied or replaced, UIDs are re-derived, private tags
are dropped, and every patient id (in the files, ``records.csv`` and ``images.csv``) becomes
a salted SHA-256 pseudonym. The same salt gives the same pseudonym, so image–record joins
and later imports stay consistent; without the salt the pseudonyms cannot be reversed.

Hand-rolled action table: pydicom ships no de-identification profile, and the separate
``deid`` package would add a dependency for a few dozen tag actions. The table covers the
basic profile's attributes that occur in ordinary CT/MR/CR/DX/US files; anything private is
removed wholesale.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.uid import generate_uid

__all__ = ["pseudonym", "deidentify_dicom", "deidentify_site", "REMOVE", "EMPTY", "UIDS"]

# Basic profile actions (PS3.15 Table E.1-1), for the attributes common in imaging files.
REMOVE = (
    "PatientBirthTime", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician",
    "DeviceSerialNumber", "PlateID", "DetectorID", "ProtocolName", "StudyDescription",
    "SeriesDescription", "RequestAttributesSequence", "ImageComments", "CurrentPatientLocation",
    "PatientInstitutionResidence", "InstanceCreationDate", "InstanceCreationTime",
    "AcquisitionDateTime", "IssuerOfPatientID", "PatientInsurancePlanCodeSequence",
)
EMPTY = (
    "PatientName", "PatientBirthDate", "ReferringPhysicianName", "AccessionNumber", "StudyID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime",
)
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def pseudonym(value: str, salt: bytes) -> str:
    """Salted, irreversible, stable replacement for a patient id."""
    return "p-" + hashlib.sha256(salt + str(value).encode()).hexdigest()[:20]


def deidentify_dicom(src: Path, dst: Path, *, salt: bytes) -> str:
    """Write a de-identified copy of one DICOM file; returns the patient's pseudonym."""
    ds = pydicom.dcmread(src)
    original = str(ds.get("PatientID", "") or src.stem)
    pid = pseudonym(original, salt)
    ds.remove_private_tags()
    for kw in REMOVE:
        if kw in ds:
            delattr(ds, kw)
    for kw in EMPTY:
        if kw in ds:
            setattr(ds, kw, "")
    for kw in UIDS:  # a stable new UID per original (series stay series), not the original
        if kw in ds:
            setattr(ds, kw, generate_uid(entropy_srcs=[salt.hex(), str(ds.get(kw))]))
    if "SOPInstanceUID" in ds and getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = pid
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "fedmed: DICOM PS3.15 basic profile, salted pseudonyms"
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return pid


def deidentify_site(site_dir: Path, out: Path, *, salt: bytes, id_column: str = "patient_id") -> dict[str, int]:
    """A de-identified copy of a site folder (records, images table and image files)."""
    site_dir, out = Path(site_dir), Path(out)
    if len(salt) < 16:
        raise ValueError("the salt must be at least 16 bytes (keep it secret, at the site)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {"records": 0, "images": 0, "dicom": 0}
    rec = site_dir / "records.csv"
    if rec.exists():
        df = pd.read_csv(rec, dtype={id_column: str}, keep_default_na=True)
        df[id_column] = [pseudonym(v, salt) for v in df[id_column]]
        df.to_csv(out / "records.csv", index=False)
        counts["records"] = len(df)
    img = site_dir / "images.csv"
    if img.exists():
        df = pd.read_csv(img, dtype={id_column: str})
        paths = []
        for k, (path, pid) in enumerate(zip(df["image"], df[id_column])):
            src = Path(path) if Path(path).is_absolute() else site_dir / path
            name = f"images/{pseudonym(pid, salt)}-{k:05d}{src.suffix.lower() or '.dcm'}"
            if src.suffix.lower() in (".dcm", ".dicom", ""):
                deidentify_dicom(src, out / name, salt=salt)
                counts["dicom"] += 1
            else:  # raster images carry no header identifiers; the file name is replaced
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / name)
            paths.append(name)
        df["image"] = paths
        df[id_column] = [pseudonym(v, salt) for v in df[id_column]]
        df.to_csv(out / "images.csv", index=False)
        counts["images"] = len(df)
    return counts
