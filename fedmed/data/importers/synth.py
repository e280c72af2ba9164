"""A synthetic multi-site cohort written as real DICOM files plus patient records.

Why: an end-to-end run (import → federate → evaluate) needs data with the properties that
make fusion and federation matter, on any machine, with no licence question. The label
depends on two independent latent factors, one visible only in the image (a bright round
lesion whose contrast and size grow with it) and one visible only in the record (crp, wbc and
weaker vitals), so image+record beats either alone. Sites differ the way hospitals do:
prevalence (label skew), size (quantity skew), scanner (modality, photometric
interpretation, rescale, window, intensity gain/offset, noise) and lab calibration.
~3 % of each site's patients have no image and ~3 % no record (missing modalities).

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same
pixels, records and UIDs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from statistics import NormalDist
from typing import overload

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from fedmed.data.importers import ImportReport, write_dataset_config
from fedmed.errors import UsageError

__all__ = ["SYNTH_CLASSES", "SYNTH_NUMERIC", "default_site_sizes", "site_names", "synthesize"]

SYNTH_CLASSES = ["negative", "positive"]
SYNTH_NUMERIC = ["age", "crp", "wbc", "heart_rate", "temperature", "spo2"]
_LABS = ["crp", "wbc", "heart_rate", "temperature", "spo2"]

# risk = _W_IMG * z_img + _W_REC * z_rec + N(0, _NOISE); label = risk > 0. Knowing the image
# factor exactly gives ~76 % accuracy, the record factor ~73 %, both ~95 % (at 50 % prevalence).
# Through the pixels and noisy labs, logistic regression on simple features reaches about
# 0.75 (image) / 0.70 (record) / 0.87 (both) on 3 x 800 patients.
_W_IMG, _W_REC, _NOISE = 1.0, 0.9, 0.2
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["fedmed", "synth", "implementation"])


@dataclass(frozen=True)
class _Scanner:
    """One site's acquisition: how display intensity in [0, 1] becomes stored pixels."""

    modality: str
    sop_class: UID
    photometric: str
    signed: bool
    slope: float
    intercept: float
    center: float
    width: float
    manufacturer: str
    model: str
    spacing: float
    gain: float
    offset: float
    noise: float


_SCANNERS = [
    _Scanner("CT", CTImageStorage, "MONOCHROME2", True, 1.0, 0.0, 40.0, 400.0,
             "Acme Medical Systems", "AcmeCT 64", 0.70, 1.00, 0.00, 0.030),
    _Scanner("DX", DigitalXRayImageStorageForPresentation, "MONOCHROME1", False, 1.0, 0.0,
             2048.0, 4000.0, "Globex Imaging", "GlobexDR 2", 0.15, 0.85, 0.06, 0.045),
    _Scanner("CT", CTImageStorage, "MONOCHROME2", False, 1.0, -1024.0, 50.0, 350.0,
             "Initech Radiology", "Initech Spiral 16", 0.80, 1.12, -0.04, 0.025),
    _Scanner("CR", ComputedRadiographyImageStorage, "MONOCHROME1", False, 0.5, -100.0,
             700.0, 1200.0, "Umbrella Diagnostics", "UmbrellaCR 1", 0.20, 0.93, 0.03, 0.038),
]
_PREVALENCE = [0.45, 0.30, 0.60, 0.38, 0.52, 0.25, 0.65]
# Per-site lab calibration: crp multiplier, wbc offset, temperature offset.
_LAB_CAL = [(1.00, 0.0, 0.0), (1.25, 0.6, 0.2), (0.85, -0.4, -0.1), (1.10, 0.3, 0.1)]

_HIGH = ["fever", "productive cough", "shortness of breath", "chest pain", "night sweats",
         "chills", "rapid breathing"]
_LOW = ["mild headache", "fatigue", "a runny nose", "seasonal allergies", "back pain",
        "poor sleep", "no acute complaints"]


def default_site_sizes(sites: int) -> list[int]:
    """Patients per site by default: 400/250/150 for three sites (quantity skew); for other
    counts a geometric run from 400 down to 100, rounded to 10."""
    if sites <= 3:
        return [400, 250, 150][:sites]
    return [int(round(v, -1)) for v in np.geomspace(400, 100, sites)]


@overload
def _sigmoid(x: float) -> float: ...
@overload
def _sigmoid(x: np.ndarray) -> np.ndarray: ...
def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def _image(rng: np.random.Generator, z: float, size: int, sc: _Scanner,
           yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Display intensity in [0, 1]: body ellipse + soft structures + lesion + noise."""
    s = size / 64.0
    cy, cx = size / 2 + rng.normal(0, 2 * s, 2)
    ry, rx = size * rng.uniform(0.38, 0.46), size * rng.uniform(0.32, 0.42)
    ell = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    img = 0.06 + 0.30 * _sigmoid((1.0 - ell) * 12.0)
    for _ in range(3):  # broad anatomy-like structures: nuisance, not signal
        gy, gx = rng.uniform(0.25, 0.75, 2) * size
        sig = rng.uniform(7, 14) * s
        img += rng.uniform(-0.08, 0.08) * np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * sig**2))
    # The lesion: same soft-disc shape everywhere; contrast and radius grow with z.
    amp = 0.05 + 0.33 * _sigmoid(1.7 * (z + rng.normal(0, 0.15)))
    radius = (6.0 + 6.0 * _sigmoid(0.9 * z + rng.normal(0, 0.4))) * s
    ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.45) * min(ry, rx)
    ly, lx = cy + dist * np.sin(ang), cx + dist * np.cos(ang)
    d = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
    img += amp * _sigmoid((radius - d) / (1.2 * s))
    img += rng.normal(0, sc.noise, img.shape)
    return np.clip(img * sc.gain + sc.offset, 0.0, 1.0)


def _to_stored(img: np.ndarray, sc: _Scanner) -> np.ndarray:
    """Invert the viewer pipeline (rescale → window → MONOCHROME1 inversion) to 12-bit."""
    shown = 1.0 - img if sc.photometric == "MONOCHROME1" else img
    value = sc.center - sc.width / 2 + shown * sc.width
    stored = np.rint((value - sc.intercept) / sc.slope)
    lo, hi = (-2048, 2047) if sc.signed else (0, 4095)
    return np.clip(stored, lo, hi).astype(np.int16 if sc.signed else np.uint16)


def _dicom_template(sc: _Scanner, size: int) -> FileDataset:
    """The headers one site's scanner writes on every image; per-patient fields come later.

    Building the dataset once per site and updating a few elements per file keeps the
    synthesis fast (pydicom element creation dominates otherwise).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sc.sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    ds = FileDataset("template.dcm", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sc.sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.ContentDate = "20180101"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.Modality = sc.modality
    ds.Manufacturer = sc.manufacturer
    ds.ManufacturerModelName = sc.model
    ds.PatientName = "SYNTH^0"
    ds.PatientID = "0"
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if sc.modality == "CT" else [
        "ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = sc.photometric
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [sc.spacing, sc.spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if sc.signed else 0
    ds.WindowCenter = sc.center
    ds.WindowWidth = sc.width
    ds.RescaleIntercept = sc.intercept
    ds.RescaleSlope = sc.slope
    ds.RescaleType = "HU" if sc.modality == "CT" else "US"
    ds.PixelData = b""
    return ds


def _write_dicom(ds: FileDataset, path: Path, pixels: np.ndarray, *, pid: str, name: str,
                 sex: str, study: date, uid_seed: list[str]) -> None:
    """Fill the per-patient fields of a site template and save it as a DICOM file."""
    sop_uid = generate_uid(entropy_srcs=[*uid_seed, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "series"])
    ds.PatientID = pid
    ds.PatientName = name
    ds.PatientSex = sex
    ds.StudyDate = ds.ContentDate = study.strftime("%Y%m%d")
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _note(rng: np.random.Generator, z_rec: float) -> str:
    """Short free text; symptom choice leans (weakly) on the record factor."""
    high = rng.random() < _sigmoid(0.8 * z_rec + rng.normal(0, 0.8))
    bank = _HIGH if high else _LOW
    a, b = rng.choice(len(bank), 2, replace=False)
    days = int(rng.integers(1, 15))
    form = int(rng.integers(0, 3))
    if form == 0:
        return f"patient reports {bank[a]} and {bank[b]} for {days} days"
    if form == 1:
        return f"{bank[a]} since {days} days, also {bank[b]}"
    return f"seen for {bank[a]}; {days} days history"


def _site_sizes(sites: int, patients_per_site: int | list[int] | None) -> list[int]:
    if patients_per_site is None:
        return default_site_sizes(sites)
    if isinstance(patients_per_site, int):
        sizes = [patients_per_site] * sites
    else:
        sizes = [int(n) for n in patients_per_site]
        if len(sizes) != sites:
            raise UsageError(
                f"patients_per_site has {len(sizes)} entries for {sites} sites; give one per site"
            )
    if any(n < 10 for n in sizes):
        raise UsageError("patients_per_site must be at least 10 per site")
    return sizes


def site_names(sites: int) -> list[str]:
    """hospital_a, hospital_b, ... (hospital_27 onwards past z)."""
    return [f"hospital_{chr(97 + i)}" if i < 26 else f"hospital_{i + 1}" for i in range(sites)]


def synthesize(
    out: str | Path,
    *,
    sites: int = 3,
    patients_per_site: int | list[int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    notes: bool = True,
    central: int = 0,
) -> ImportReport:
    """Write a synthetic cohort to ``<out>/hospital_a..`` and ``<out>/fedmed-data.yaml``.

    ``central > 0`` also writes ``<out>/central`` with that many patients (one more
    scanner/prevalence profile): the coordinator's held-out set for central evaluation.

    Each site gets ``images/<patient_id>.dcm`` (12-bit DICOM, per-site scanner settings),
    ``images.csv`` (relative paths, with labels) and ``records.csv`` (age, sex, crp, wbc,
    heart_rate, temperature, spo2 with ~5-10 % gaps in the labs, and ``notes`` unless
    ``notes=False``). Classes are ``negative``/``positive``. Default sizes come from
    :func:`default_site_sizes` (400/250/150 for three sites). About 3 % of each site's
    patients have no image and 3 % no record. Deterministic for a given seed. Raises
    ``ValueError`` for out-of-range arguments.
    """
    if not 1 <= sites <= 64:
        raise UsageError(f"sites must be between 1 and 64, got {sites}")
    if not 16 <= image_size <= 1024:
        raise UsageError(f"image_size must be between 16 and 1024, got {image_size}")
    sizes = _site_sizes(sites, patients_per_site)
    out = Path(out)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    sd_risk = math.sqrt(_W_IMG**2 + _W_REC**2 + _NOISE**2)
    report = ImportReport(out_dir=out, classes=list(SYNTH_CLASSES))
    # (folder, scanner/lab/prevalence profile, patients, id prefix, random stream)
    parts = [(name, i, n, name, i) for i, (name, n) in enumerate(zip(site_names(sites), sizes, strict=True))]
    if central:
        if central < 10:
            raise UsageError("central must be 0 or at least 10 patients")
        # The coordinator's held-out set mixes patients of every site's profile, so central
        # evaluation measures the federation's population, not one more unseen scanner.
        per = [central // sites + (1 if p < central % sites else 0) for p in range(sites)]
        parts += [("central", p, k, f"central{p + 1}", 1000 + p) for p, k in enumerate(per) if k]
    collected: dict[str, tuple[list[pd.DataFrame], list[pd.DataFrame]]] = {}
    for site, i, n, prefix, stream in parts:
        # Independent streams per site and purpose: turning notes off, or changing another
        # site's size, leaves this site's latents, labs and pixels unchanged.
        rng, rng_rec, rng_note, rng_img = (np.random.default_rng([seed, stream, k]) for k in range(4))
        sc = _SCANNERS[i % len(_SCANNERS)]
        if i >= len(_SCANNERS):  # more sites than profiles: vary the scanner a little
            sc = _Scanner(**{**sc.__dict__, "gain": sc.gain * rng.uniform(0.9, 1.1),
                             "offset": sc.offset + rng.uniform(-0.03, 0.03),
                             "noise": sc.noise * rng.uniform(0.8, 1.2)})
        crp_gain, wbc_off, temp_off = _LAB_CAL[i % len(_LAB_CAL)]
        prev = _PREVALENCE[i % len(_PREVALENCE)]
        # Shift both latent factors so P(risk > 0) = prev: P(label | latent factors) is the
        # same at every site (only the case mix differs); what each site *measures* of
        # those factors is shifted by its scanner and lab calibration.
        mu = NormalDist().inv_cdf(prev) * sd_risk / (_W_IMG + _W_REC)
        z_img = rng.normal(mu, 1.0, n)
        z_rec = rng.normal(mu, 1.0, n)
        risk = _W_IMG * z_img + _W_REC * z_rec + rng.normal(0, _NOISE, n)
        label = np.where(risk > 0, SYNTH_CLASSES[1], SYNTH_CLASSES[0])
        ids = [f"{prefix}-p{j + 1:04d}" for j in range(n)]
        sex = rng.choice(["F", "M"], n)

        records = pd.DataFrame({
            "patient_id": ids,
            "label": label,
            "age": np.clip(np.rint(56 + 8 * z_rec + rng_rec.normal(0, 14, n)), 18, 95),
            "sex": sex,
            "crp": np.round(np.exp(1.6 + 0.9 * z_rec + rng_rec.normal(0, 0.35, n)) * crp_gain,
                            1),
            "wbc": np.round(7.5 + 1.8 * z_rec + rng_rec.normal(0, 1.0, n) + wbc_off,
                            1).clip(0.5),
            "heart_rate": np.rint(78 + 5 * z_rec + rng_rec.normal(0, 10, n)),
            "temperature": np.round(37.0 + 0.35 * z_rec + rng_rec.normal(0, 0.4, n) + temp_off,
                                    1),
            "spo2": np.clip(np.rint(97 - 1.0 * z_rec + rng_rec.normal(0, 1.5, n)), 80, 100),
        })
        for col in _LABS:  # each lab ~5-10 % missing, at random
            records.loc[rng_rec.random(n) < rng_rec.uniform(0.05, 0.10), col] = np.nan
        records.loc[rng_rec.random(n) < 0.02, "age"] = np.nan
        if notes:
            records["notes"] = [_note(rng_note, z) if rng_note.random() > 0.03 else None
                                for z in z_rec]

        # Missing modalities: ~3 % record-only, ~3 % image-only (disjoint).
        k = max(1, round(0.03 * n))
        order = rng.permutation(n)
        no_image, no_record = set(order[:k].tolist()), set(order[k:2 * k].tolist())

        img_dir = out / site / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        first_day = date(2018, 1, 1)
        template = _dicom_template(sc, image_size)
        image_rows = []
        for j, pid in enumerate(ids):
            if j in no_image:
                (img_dir / f"{pid}.dcm").unlink(missing_ok=True)  # stale from a re-run
                continue
            pixels = _to_stored(_image(rng_img, float(z_img[j]), image_size, sc, yy, xx), sc)
            study = first_day + timedelta(days=int(rng_img.integers(0, 6 * 365)))
            _write_dicom(template, img_dir / f"{pid}.dcm", pixels, pid=pid,
                         name=f"SYNTH^{i + 1:02d}{j + 1:04d}", sex=str(sex[j]), study=study,
                         uid_seed=["fedmed-synth", str(seed), pid])
            image_rows.append({"image": f"images/{pid}.dcm", "patient_id": pid,
                               "label": label[j]})
        keep = [j for j in range(n) if j not in no_record]
        records = records.iloc[keep].reset_index(drop=True)
        images = pd.DataFrame(image_rows)
        recs, imgs = collected.setdefault(site, ([], []))
        recs.append(records)
        imgs.append(images)
    for site, (recs, imgs) in collected.items():
        records = pd.concat(recs, ignore_index=True)
        images = pd.concat(imgs, ignore_index=True)
        report.add_site(site, records=records, images=images)

    report.config_path = write_dataset_config(
        out,
        classes=SYNTH_CLASSES,
        numeric=SYNTH_NUMERIC,
        categorical={"sex": ["F", "M"]},
        notes_column="notes" if notes else None,
        channels=1,
        image_size=image_size,
        comment=f"Synthetic cohort (fedmed synth, seed {seed}); no real patient data.",
    )
    return report.verify()
