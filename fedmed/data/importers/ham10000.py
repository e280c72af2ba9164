"""HAM10000 dermoscopy (images + patient metadata) → one site folder per centre.

The ``dataset`` column is the centre, so the import gives a real non-IID federation. The
lesion is the patient unit (several images can show one lesion), so splits made downstream
keep a lesion on one side. ``dx_type`` (how the label was confirmed) is tied to the label and
is never written as a feature; neither is ``image_id``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from fedmed.data.importers import (
    DatasetImportError,
    ImportReport,
    read_source_csv,
    write_dataset_config,
)

__all__ = ["HAM_CLASSES", "METADATA_FILE", "import_ham10000"]

METADATA_FILE = "HAM10000_metadata.csv"
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]  # alphabetical, fixed
_REQUIRED = ["lesion_id", "image_id", "dx", "age", "sex", "localization", "dataset"]
_FEATURES = ["age", "sex", "localization"]
_UNKNOWN = "unknown"


def _read_metadata(path: Path) -> pd.DataFrame:
    df = read_source_csv(path, what="HAM10000 metadata file")
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise DatasetImportError(f"{path}: missing column(s) {missing}")
    df = df[_REQUIRED].fillna("").apply(lambda s: s.str.strip())
    df = df[(df != "").any(axis=1)]
    for col in ("lesion_id", "image_id", "dx", "dataset"):
        empty = df.index[df[col] == ""]
        if len(empty):
            raise DatasetImportError(
                f"{path}: column {col!r} is empty on {len(empty)} row(s), first at line "
                f"{int(empty[0]) + 2}"
            )
    bad_dx = df.index[~df["dx"].isin(HAM_CLASSES)]
    if len(bad_dx):
        raise DatasetImportError(
            f"{path}: column 'dx' has {len(bad_dx)} value(s) outside {HAM_CLASSES}, first at "
            f"line {int(bad_dx[0]) + 2}"
        )
    age = pd.to_numeric(df["age"].where(df["age"] != ""), errors="coerce")
    bad_age = df.index[age.isna() & (df["age"] != "")]
    if len(bad_age):
        raise DatasetImportError(
            f"{path}: column 'age' is not numeric on {len(bad_age)} row(s), first at line "
            f"{int(bad_age[0]) + 2}"
        )
    df["age"] = age
    bad_sex = df.index[~df["sex"].isin(["male", "female", _UNKNOWN, ""])]
    if len(bad_sex):
        raise DatasetImportError(
            f"{path}: column 'sex' has {len(bad_sex)} value(s) outside male/female/unknown, "
            f"first at line {int(bad_sex[0]) + 2}"
        )
    # "unknown" is the source's missing-value marker; the contract's is an empty cell.
    for col in ("sex", "localization"):
        df[col] = df[col].where(~df[col].isin(["", _UNKNOWN]))
    dup = int(df["image_id"].duplicated().sum())
    if dup:
        raise DatasetImportError(f"{path}: {dup} image_id value(s) appear on more than one row")
    spans = df.groupby("lesion_id")["dataset"].nunique()
    if (spans > 1).any():
        raise DatasetImportError(
            f"{path}: {int((spans > 1).sum())} lesion(s) appear under more than one 'dataset' "
            "(centre); a patient must belong to one site"
        )
    return df


def import_ham10000(
    src: str | Path,
    out: str | Path,
    *,
    copy_images: bool = False,
    image_size: int = 64,
) -> ImportReport:
    """Import HAM10000 from ``src`` (``HAM10000_metadata.csv`` + ``images/ISIC_*.jpg``).

    Writes ``<out>/<centre>/records.csv`` (one row per lesion: ``age``, ``sex``,
    ``localization``) and ``images.csv`` (absolute source paths, or copies under
    ``<centre>/images/`` with ``copy_images``), plus ``<out>/fedmed-data.yaml``. A lesion whose
    images disagree on age/sex/localization keeps its first image's values (counted in
    ``report.notes``). Raises :class:`DatasetImportError` naming the file when the metadata is
    missing or malformed or a listed image file is absent.
    """
    src, out = Path(src), Path(out)
    meta_path = src / METADATA_FILE
    df = _read_metadata(meta_path)
    img_dir = src / "images"
    if not img_dir.is_dir():
        raise DatasetImportError(f"HAM10000 image folder not found: {img_dir}")
    present = {p.name for p in img_dir.iterdir()}
    files = df["image_id"] + ".jpg"
    absent = files[~files.isin(present)]
    if len(absent):
        raise DatasetImportError(
            f"{len(absent)} image file(s) listed in {meta_path} are missing from {img_dir}, "
            f"e.g. {img_dir / absent.iloc[0]}"
        )

    localizations = sorted(df["localization"].dropna().unique().tolist())
    report = ImportReport(out_dir=out, classes=list(HAM_CLASSES))
    conflicts = 0
    for site in sorted(df["dataset"].unique()):
        rows = df[df["dataset"] == site]
        per_lesion = rows.groupby("lesion_id", sort=False)[_FEATURES].nunique(dropna=False)
        conflicts += int((per_lesion > 1).any(axis=1).sum())
        records = (
            rows.drop_duplicates("lesion_id", keep="first")
            .rename(columns={"lesion_id": "patient_id", "dx": "label"})
            [["patient_id", "label", *_FEATURES]]
            .reset_index(drop=True)
        )
        site_dir = out / site
        if copy_images:
            (site_dir / "images").mkdir(parents=True, exist_ok=True)
            image_col = []
            for image_id in rows["image_id"]:
                # copyfile, not copy2: the source is often read-only and a re-import must
                # be able to overwrite the copies.
                name = f"{image_id}.jpg"
                shutil.copyfile(img_dir / name, site_dir / "images" / name)
                image_col.append(f"images/{image_id}.jpg")
        else:
            base = img_dir.resolve()
            image_col = [str(base / f"{i}.jpg") for i in rows["image_id"]]
        images = pd.DataFrame(
            {"image": image_col, "patient_id": rows["lesion_id"].to_numpy(),
             "label": rows["dx"].to_numpy()}
        )
        report.add_site(site, records=records, images=images)
    if conflicts:
        report.notes.append(
            f"{conflicts} lesion(s) had images that disagree on age/sex/localization; "
            "the first image's values were kept"
        )
    report.config_path = write_dataset_config(
        out,
        classes=HAM_CLASSES,
        numeric=["age"],
        categorical={"sex": ["female", "male"], "localization": localizations},
        channels=3,
        image_size=image_size,
        image_roots=() if copy_images else [img_dir],
        comment="HAM10000 (CC BY-NC 4.0: non-commercial use only). Sites = the 'dataset' "
        "column;\npatient_id = lesion_id. dx_type is deliberately not a feature.",
    )
    return report.verify()
