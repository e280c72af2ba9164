"""De-identification of a site folder: DICOM PS3.15 basic profile + salted pseudonyms.

``fedmed data deidentify SITE_DIR --out DIR --salt-file SALT --notes drop|scrub|keep`` writes a
copy of a site in which

- every DICOM file is cleaned to the **Basic Application Level Confidentiality Profile**
  (PS3.15 Annex E, Table E.1-1) at every nesting level: each attribute of the table gets its
  action (D dummy, Z empty, X remove, U new UID, K keep), kept sequences are cleaned item by
  item, private attributes, unknown public attributes, curve (50xx) and overlay (60xx) groups,
  everything after the pixel data (digital signatures, trailing padding) and the 128-byte
  preamble are removed, and the file meta header is rebuilt from the new UIDs;
- UIDs are replaced by salted hashes of the originals (stable within a site and across
  imports with the same salt, so series stay series and references still resolve);
- every patient id (in the files, ``records.csv`` and ``images.csv``) becomes a salted SHA-256
  pseudonym; the same salt gives the same pseudonym, without it they cannot be reversed;
- images whose pixels may show the patient (``BurnedInAnnotation`` or
  ``RecognizableVisualFeatures`` YES) are refused, and those of modalities that often burn
  text in but that do not say (US, secondary capture, XA, RF, ...) are refused or listed, by
  site choice; refusals are listed in ``review.csv`` by ``images.csv`` line, never silently;
- the records' free-text notes are dropped, scrubbed (:mod:`fedmed.data.scrub`) or kept, by
  an explicit site choice: there is no default.

Why ``dicom-anonymizer`` (KitwareMedical): of the maintained packages it is the one whose table
*is* the standard's. Its ``dicomfields_2026c`` module is generated from Table E.1-1 of DICOM
2026c (655 attributes with their D/Z/X/U and conditional actions, plus the 50xx/60xx masks), and
it is refreshed with each DICOM release. ``dicognito`` and pydicom/``deid`` encode their own
hand lists (dicognito keeps PatientAge/Size/Weight and descriptions; deid's default recipe is a
site's keyword list); pydicom ships no profile. We take only the table from it: its applier
does not descend into the items of sequences it keeps, maps UIDs to random values held in a
module global (not stable across runs) and writes 00010101 for removed dates, so the short
walker below applies the table itself.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pydicom
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _table_e1_1
from dicomanonymizer.simpledicomanonymizer import replace_element
from pydicom.datadict import get_entry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, generate_uid

from fedmed.data.scrub import identifying_columns, scrub_text
from fedmed.errors import UsageError

__all__ = ["PROFILE", "ACTIONS", "BURN_IN_MODALITIES", "DicomOutcome", "pseudonym",
           "deidentify_dataset", "deidentify_dicom", "deidentify_site"]

log = logging.getLogger(__name__)

PROFILE = "DICOM PS3.15 E.1-1 Basic Application Level Confidentiality Profile (table of DICOM 2026c)"
# The library files each attribute under its action; the conditional ones (X/Z, X/D, Z/D, X/Z/D)
# resolve as it does, to the action that keeps a Type 1/2 attribute present (Z or D).
_RESOLVE = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D",
            "X_Z_TAGS": "Z", "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U*"}
ACTIONS: dict[int, str] = {}
_MASKED: list[tuple[int, int, int, int, str]] = []  # (group, element, group mask, elem mask)
for _cat, _code in _RESOLVE.items():
    for _t in getattr(_table_e1_1, _cat):
        if len(_t) == 2:
            ACTIONS[(_t[0] << 16) | _t[1]] = _code
        else:
            _MASKED.append((*_t, _code))

# Modalities whose images often carry burned-in text (report screens, US/angio overlays).
BURN_IN_MODALITIES = frozenset({"US", "IVUS", "SC", "OT", "XA", "RF", "ES", "XC", "GM", "SM",
                                "DOC", "ECG", "HD", "OP"})
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # SC image storage and its .1-.4 variants
_PIXEL_DATA = 0x7FE00010
_CODE_BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")

Unlabelled = Literal["refuse", "review"]
NotesChoice = Literal["drop", "scrub", "keep"]


@dataclass(frozen=True)
class DicomOutcome:
    """What became of one file: ``written`` or not, and why a person should look at it."""

    pseudonym: str | None
    written: bool
    review: str = ""  # fixed words only ("" = nothing to review)


def pseudonym(value: str, salt: bytes) -> str:
    """Salted, irreversible, stable replacement for a patient id."""
    return "p-" + hashlib.sha256(salt + str(value).encode()).hexdigest()[:20]


def _uid_mapper(salt: bytes) -> Callable[[str], str]:
    def new_uid(old: str) -> str:
        return str(generate_uid(entropy_srcs=[salt.hex(), str(old)]))
    return new_uid


def _action(tag: BaseTag) -> str | None:
    code = ACTIONS.get(int(tag))
    if code is not None:
        return code
    for group, elem, gmask, emask, code in _MASKED:
        if tag.group & gmask == group & gmask and tag.element & emask == elem & emask:
            return code
    return None


def _drop_whole(tag: BaseTag) -> bool:
    """Private, curve/overlay groups, group lengths and public tags no dictionary knows."""
    if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000) or tag.element == 0:
        return True
    try:
        get_entry(tag)
    except KeyError:
        return True
    return False


def _set_uid(elem: pydicom.DataElement, new_uid: Callable[[str], str]) -> None:
    values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
    mapped = [new_uid(v) for v in values if v]
    elem.value = mapped if len(mapped) != 1 else mapped[0]


def _dummy(ds: Dataset, elem: pydicom.DataElement, new_uid: Callable[[str], str]) -> None:
    """D: a dummy of the element's VR; inside a replaced sequence every element is replaced."""
    if elem.VR == "SQ":
        for item in elem.value:
            for sub in list(item):
                _dummy(item, sub, new_uid)
    elif elem.VR == "UI":
        _set_uid(elem, new_uid)
    else:
        try:
            replace_element(elem)  # the library's per-VR dummy values
        except NotImplementedError:  # a VR it has no dummy for: removing is stricter
            del ds[elem.tag]


def _clean(ds: Dataset, new_uid: Callable[[str], str]) -> None:
    for elem in list(ds):
        tag = elem.tag
        if _drop_whole(tag):
            del ds[tag]
            continue
        code = _action(tag)
        if code == "X":
            del ds[tag]
        elif code == "Z":
            elem.value = Sequence() if elem.VR == "SQ" else None
        elif code == "D":
            _dummy(ds, elem, new_uid)
        elif code in ("U", "U*") and elem.VR == "UI":
            _set_uid(elem, new_uid)
        elif code == "U":  # a UID action on a non-UID element: nothing safe to keep
            del ds[tag]
        elif elem.VR == "SQ":  # K or U*: keep the sequence, clean its items by the table
            for item in elem.value:
                _clean(item, new_uid)


def _burn_in_risk(ds: Dataset, *, unlabelled: Unlabelled) -> tuple[bool, str]:
    """(refuse?, review reason) from the pixel-content flags, before anything is changed."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return True, "BurnedInAnnotation is YES (identifying text in the pixels)"
    if str(ds.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        return True, "RecognizableVisualFeatures is YES (e.g. a face in the pixels)"
    modality = str(ds.get("Modality", "")).strip().upper()
    sc = str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE)
    if not str(ds.get("BurnedInAnnotation", "")).strip() and (modality in BURN_IN_MODALITIES or sc):
        why = (f"BurnedInAnnotation absent on a {'secondary capture' if sc else modality} image "
               "(this kind often has burned-in text): check the pixels")
        return unlabelled == "refuse", why
    return False, ""


def deidentify_dataset(ds: pydicom.FileDataset | Dataset, *, salt: bytes,
                       patient_id: str | None = None) -> str:
    """Clean ``ds`` in place to the basic profile; returns the patient's pseudonym.

    ``patient_id`` (e.g. from ``images.csv``) names the patient when given, else the
    dataset's PatientID. Does not look at the pixels: call :func:`deidentify_dicom` for the
    burned-in annotation gate.
    """
    original = patient_id if patient_id is not None else str(ds.get("PatientID", "") or "")
    pid = pseudonym(original, salt)
    new_uid = _uid_mapper(salt)
    for elem in list(ds):  # digital signatures, trailing padding, anything appended
        if int(elem.tag) > _PIXEL_DATA:
            del ds[elem.tag]
    _clean(ds, new_uid)
    ds.PatientID = pid
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "fedmed: PS3.15 basic profile (2026c), salted ids/UIDs"  # LO: 64
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _CODE_BASIC_PROFILE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    old_meta = getattr(ds, "file_meta", None)
    if old_meta is not None:  # rebuilt: AE titles, private info and source UIDs do not survive
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", old_meta.get("MediaStorageSOPClassUID"))
        meta.MediaStorageSOPInstanceUID = UID(ds.get("SOPInstanceUID") or new_uid(
            str(old_meta.get("MediaStorageSOPInstanceUID", ""))))
        meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
        ds.file_meta = meta
    if hasattr(ds, "preamble"):
        ds.preamble = b"\0" * 128
    return pid


def deidentify_dicom(src: Path, dst: Path, *, salt: bytes, patient_id: str | None = None,
                     unlabelled: Unlabelled = "refuse") -> DicomOutcome:
    """Write a de-identified copy of one DICOM file, unless its pixels may identify.

    Refused (nothing written, ``review`` says why): BurnedInAnnotation or
    RecognizableVisualFeatures YES; files that cannot be read; with ``unlabelled="refuse"``
    also images of :data:`BURN_IN_MODALITIES` / secondary capture that do not state
    BurnedInAnnotation (``"review"`` writes them and says so in ``review``).
    """
    try:
        ds = pydicom.dcmread(src)
    except Exception as exc:  # pydicom raises many types on damaged files
        log.debug("deidentify: %s unreadable (%s)", src, type(exc).__name__)
        return DicomOutcome(None, False, f"not a readable DICOM file ({type(exc).__name__}): refused")
    refuse, why = _burn_in_risk(ds, unlabelled=unlabelled)
    if refuse:
        return DicomOutcome(None, False, why + ": refused")
    pid = deidentify_dataset(ds, salt=salt, patient_id=patient_id)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return DicomOutcome(pid, True, why)


def _notes(df: pd.DataFrame, *, column: str, choice: NotesChoice | None, id_column: str,
           known: dict[str, set[str]]) -> tuple[pd.DataFrame, int]:
    """Apply the site's notes choice; returns the table and how many notes were changed."""
    if column not in df.columns:
        return df, 0
    if choice is None:
        raise UsageError(f"records.csv has a free-text column {column!r}: choose what happens to "
                         "it with --notes drop|scrub|keep (no default: free text often holds "
                         "names, dates and ids)")
    if choice == "drop":
        return df.drop(columns=[column]), int(df[column].notna().sum())
    if choice == "keep":
        return df, 0
    extra = identifying_columns(df.columns, exclude=[column])
    out, changed = [], 0
    for _, row in df.iterrows():
        text = row[column]
        if not isinstance(text, str):
            out.append(text)
            continue
        values = {str(row[c]) for c in [id_column, *extra] if pd.notna(row[c])}
        values |= known.get(str(row[id_column]), set())
        clean = scrub_text(text, known=values)
        changed += clean != text
        out.append(clean)
    return df.assign(**{column: out}), changed


def _header_identifiers(src: Path) -> set[str]:
    """Names and ids a DICOM header holds for its patient (to scrub them from the notes)."""
    try:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
    except Exception:
        return set()
    found: set[str] = set()
    for kw in ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
               "PatientID", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers"):
        value = ds.get(kw)
        for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]):
            if v:
                found |= {p for p in re.split(r"[\^=]", str(v)) if len(p.strip()) > 1}
    return found


def deidentify_site(site_dir: Path, out: Path, *, salt: bytes, id_column: str = "patient_id",
                    notes: NotesChoice | None = None, notes_column: str = "notes",
                    unlabelled: Unlabelled = "refuse") -> dict[str, int]:
    """A de-identified copy of a site folder (records, images table and image files).

    Returns counts (records, images written, dicom, refused, review, notes_changed). Refused
    and to-review images are listed in ``out/review.csv`` by their ``images.csv`` line.
    Raises ValueError before writing anything if the records have a notes column and no
    ``notes`` choice was made, or the salt is shorter than 16 bytes.
    """
    site_dir, out = Path(site_dir), Path(out)
    if len(salt) < 16:
        raise UsageError("the salt must be at least 16 bytes (keep it secret, at the site)")
    rec = site_dir / "records.csv"
    # As the loader reads them: only an empty cell is missing, so an id "NA" stays an id.
    records = (pd.read_csv(rec, dtype={id_column: str}, keep_default_na=False, na_values=[""])
               if rec.exists() else None)
    if records is not None and notes_column in records.columns and notes is None:
        _notes(records, column=notes_column, choice=None, id_column=id_column, known={})
    out.mkdir(parents=True, exist_ok=True)
    counts = {"records": 0, "images": 0, "dicom": 0, "refused": 0, "review": 0, "notes_changed": 0}
    known: dict[str, set[str]] = {}
    review: list[dict[str, object]] = []
    img = site_dir / "images.csv"
    if img.exists():
        df = pd.read_csv(img, dtype={id_column: str}, keep_default_na=False, na_values=[""])
        keep, paths = [], []
        for k, (path, pid) in enumerate(zip(df["image"], df[id_column], strict=True)):
            line = k + 2  # header is line 1
            src = Path(path) if Path(path).is_absolute() else site_dir / path
            name = f"images/{pseudonym(pid, salt)}-{k:05d}{src.suffix.lower() or '.dcm'}"
            if src.suffix.lower() in (".dcm", ".dicom", ""):
                known.setdefault(str(pid), set()).update(_header_identifiers(src))
                res = deidentify_dicom(src, out / name, salt=salt, patient_id=str(pid),
                                       unlabelled=unlabelled)
                if res.review:
                    review.append({"line": line, "column": "image",
                                   "status": "written" if res.written else "refused",
                                   "reason": res.review})
                if not res.written:
                    counts["refused"] += 1
                    continue
                counts["dicom"] += 1
                counts["review"] += bool(res.review)
            else:  # raster images carry no DICOM header; the file name is replaced
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / name)
            keep.append(k)
            paths.append(name)
        df = df.iloc[keep].assign(image=paths)
        df[id_column] = [pseudonym(v, salt) for v in df[id_column]]
        df.to_csv(out / "images.csv", index=False)
        counts["images"] = len(df)
    if records is not None:
        records, counts["notes_changed"] = _notes(records, column=notes_column, choice=notes,
                                                  id_column=id_column, known=known)
        records[id_column] = [pseudonym(v, salt) for v in records[id_column]]
        records.to_csv(out / "records.csv", index=False)
        counts["records"] = len(records)
    if review:
        pd.DataFrame(review).to_csv(out / "review.csv", index=False)
    elif (out / "review.csv").exists():
        (out / "review.csv").unlink()
    return counts
