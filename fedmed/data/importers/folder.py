"""Generic "image folder + CSV" → fedmed site folder(s).

For a hospital's own export: a folder of images and a CSV with one row per image (image path,
patient id, label, any record columns). The label is each image's own (a patient's follow-up
images may show different findings), so it goes to ``images.csv`` only; the record columns
are patient-level and are taken from each patient's first row; an optional site column splits
the table into several site folders. The written
``fedmed-data.yaml`` is a *suggestion* (numeric = columns that parse as numbers, categorical
= the rest with few distinct values); review it before training.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedmed.data.importers import (
    DatasetImportError,
    ImportReport,
    check_site_name,
    read_source_csv,
    write_dataset_config,
)

__all__ = ["import_folder"]

_MAX_CATEGORIES = 50  # more distinct text values than this looks like free text / an id


def _read_table(table: Path) -> pd.DataFrame:
    df = read_source_csv(table, what="table")
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda s: s.str.strip())
    df.index = df.index + 2  # file line numbers (line 1 is the header)
    df = df[(df != "").any(axis=1)]
    if df.empty:
        raise DatasetImportError(f"{table}: no data rows")
    return df


def _first_empty(df: pd.DataFrame, col: str, table: Path) -> None:
    empty = df.index[df[col] == ""]
    if len(empty):
        raise DatasetImportError(
            f"{table}: column {col!r} is empty on {len(empty)} row(s), first at line {empty[0]}"
        )


def _suggest_features(features: pd.DataFrame) -> tuple[list[str], dict[str, list[str]], list[str]]:
    numeric: list[str] = []
    categorical: dict[str, list[str]] = {}
    ignored: list[str] = []
    for col in features.columns:
        vals = features[col][features[col] != ""]
        if vals.empty:
            ignored.append(col)
            continue
        as_num = pd.to_numeric(vals, errors="coerce")
        if as_num.notna().all():
            numeric.append(col)
        elif vals.nunique() <= _MAX_CATEGORIES:
            categorical[col] = sorted(vals.unique().tolist())
        else:
            ignored.append(col)
    return numeric, categorical, ignored


def import_folder(
    images_dir: str | Path,
    table: str | Path,
    out: str | Path,
    *,
    site_column: str | None = None,
    id_column: str = "patient_id",
    label_column: str = "label",
    image_column: str = "image",
    site_name: str = "site",
) -> ImportReport:
    """Import a folder of images described by a CSV with one row per image.

    ``image_column`` holds paths relative to ``images_dir`` (or absolute); every other column
    except ``site_column`` is a record feature, taken from the patient's first row. Without a
    ``site_column`` everything goes to ``<out>/<site_name>/``. ``images.csv`` gets absolute
    image paths and each image's own label. Raises :class:`DatasetImportError` naming the
    file and column (and first line) for missing columns, empty cells, absent image files or a
    patient listed under two sites.
    """
    images_dir, table, out = Path(images_dir), Path(table), Path(out)
    if not images_dir.is_dir():
        raise DatasetImportError(f"image folder not found: {images_dir}")
    df = _read_table(table)
    required = [image_column, id_column, label_column] + ([site_column] if site_column else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetImportError(
            f"{table}: missing column(s) {missing} (columns are {list(df.columns)})"
        )
    if len(set(required)) != len(required):
        raise DatasetImportError(f"{table}: the image, id, label and site columns must differ")
    for col in required:
        _first_empty(df, col, table)

    base = images_dir.resolve()
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in df[image_column]]
    absent = [line for line, p in zip(df.index, paths, strict=True) if not p.is_file()]
    if absent:
        # The path itself is not echoed: hospital file names can embed patient identifiers.
        raise DatasetImportError(
            f"{table}: {len(absent)} image file(s) in column {image_column!r} do not exist "
            f"under {images_dir}, first at line {absent[0]}"
        )
    df = df.assign(**{image_column: [str(p) for p in paths]})

    sites = df[site_column] if site_column else pd.Series(site_name, index=df.index)
    spans = df.groupby(id_column)[site_column].nunique() if site_column else None
    if spans is not None and (spans > 1).any():
        raise DatasetImportError(
            f"{table}: {int((spans > 1).sum())} patient(s) appear under more than one value of "
            f"column {site_column!r}; a patient must belong to one site"
        )
    feature_cols = [c for c in df.columns if c not in required]
    clash = [c for c in feature_cols if c in ("patient_id", "label", "image")]
    if clash:
        raise DatasetImportError(
            f"{table}: feature column(s) {clash} would collide with the site layout's own "
            "columns; rename them or pass them as id_column/label_column/image_column"
        )
    for site in sites.unique():
        check_site_name(site)  # before anything is written
    report = ImportReport(out_dir=out, classes=sorted(df[label_column].unique().tolist()))
    site_frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    disagree_label = disagree_feat = 0
    for site in sorted(sites.unique()):
        rows = df[sites == site]
        grouped = rows.groupby(id_column, sort=False)
        disagree_label += int((grouped[label_column].nunique() > 1).sum())
        if feature_cols:
            disagree_feat += int((grouped[feature_cols].nunique() > 1).any(axis=1).sum())
        first = rows.drop_duplicates(id_column, keep="first")
        records = first[[id_column, *feature_cols]].rename(columns={id_column: "patient_id"})
        records = records.replace("", None).reset_index(drop=True)
        images = rows[[image_column, id_column, label_column]].rename(
            columns={image_column: "image", id_column: "patient_id", label_column: "label"}
        ).reset_index(drop=True)
        site_frames[str(site)] = (records, images)
    for site, (records, images) in site_frames.items():
        report.add_site(site, records=records, images=images)
    if disagree_label:
        report.notes.append(
            f"{disagree_label} patient(s) have images with different labels; each image keeps "
            "its own in images.csv (splits keep each patient on one side)"
        )
    if disagree_feat:
        report.notes.append(
            f"{disagree_feat} patient(s) have rows that disagree on feature columns; the first "
            "row's values were kept"
        )
    numeric, categorical, ignored = _suggest_features(df[feature_cols])
    report.config_path = write_dataset_config(
        out,
        classes=report.classes,
        numeric=numeric,
        categorical=categorical,
        ignore_columns=ignored,
        channels=1,
        image_size=64,
        image_roots=sorted({str(base)} | {str(p.resolve().parent) for p in paths
                                           if not p.resolve().is_relative_to(base)}),
        comment=f"Suggested from {table.name}: review numeric/categorical, channels and "
        "image_size before training.",
    )
    return report.verify()
