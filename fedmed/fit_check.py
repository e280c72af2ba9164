"""Does this data fit this model? Classes, image channels and record features, checked first.

``fedmed evaluate`` and ``fedmed predict`` run a saved model on data it never saw. A site
whose labels are not the model's classes, whose images have another number of channels, or
whose records lack the model's features would otherwise fail deep inside loading — or, for
channels, be silently converted. :func:`check_site` reads only file headers and the label /
column names and raises one :class:`DataMismatch` naming every difference.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fedmed.config import DataConfig
from fedmed.data.records import normalise_value, read_table
from fedmed.errors import FedmedError

__all__ = ["DataMismatch", "FitReport", "check_site", "feature_problems", "image_channels"]

RECORD_FILES = ("records.csv", "records.parquet")


class DataMismatch(FedmedError, ValueError):
    """The data does not fit the model; the message names what differs."""


class FitReport(dict):
    """What the check found that does not block: ignored columns, classes absent, channels seen."""


def feature_problems(columns: list[str], data: DataConfig, *, where: str) -> list[str]:
    """Missing model features in a records table's ``columns`` (extra columns are fine)."""
    need = [data.id_column, *data.numeric, *data.categorical]
    missing = [c for c in need if c not in columns]
    return [f"{where} lacks the model's record column(s) {missing}"] if missing else []


def image_channels(path: str | Path) -> int | None:
    """1 or 3 from the file header alone (PIL mode / DICOM SamplesPerPixel); None if unknown."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                mode = im.mode
        except Exception:  # noqa: BLE001 - unreadable files are reported by the image loader
            return None
        return 1 if mode in ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F") else 3
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001
        return None
    return 3 if int(getattr(ds, "SamplesPerPixel", 1) or 1) == 3 else 1


def _channel_problem(paths: list[Path], data: DataConfig) -> tuple[list[str], dict[int, int]]:
    seen = Counter(c for c in (image_channels(p) for p in paths) if c is not None)
    other = {c: n for c, n in seen.items() if c != data.channels}
    if other:
        desc = ", ".join(f"{n} with {c} channel(s)" for c, n in sorted(other.items()))
        return [f"the model takes {data.channels}-channel images; of {sum(seen.values())} images "
                f"{desc}"], dict(seen)
    return [], dict(seen)


def _label_problem(labels: list[object], data: DataConfig, where: str) -> tuple[list[str], list[str]]:
    known = {normalise_value(c) for c in data.classes}
    found = {normalise_value(v) for v in labels} - {None}
    unknown = sorted(str(v) for v in found - known)
    absent = [c for c in data.classes if normalise_value(c) not in found]
    problems = [f"{where} has label(s) {unknown} that are not among the model's classes "
                f"{list(data.classes)}"] if unknown else []
    return problems, absent


def check_site(site_dir: str | Path, data: DataConfig, *, labels: bool = True,
               uses_images: bool = True, uses_records: bool = True) -> FitReport:
    """Check a site folder against the model's data config; raise :class:`DataMismatch`.

    ``labels=False`` (prediction) skips the class check. Returns a :class:`FitReport` with
    ``ignored_columns`` (record columns the model does not use), ``absent_classes`` (model
    classes with no sample here) and ``channels`` (images per channel count).
    """
    site_dir = Path(site_dir)
    problems: list[str] = []
    report = FitReport(ignored_columns=[], absent_classes=[], channels={})
    rec = next((site_dir / n for n in RECORD_FILES if (site_dir / n).is_file()), None)
    img = site_dir / "images.csv"
    all_labels: list[object] = []
    if rec is not None:
        df = read_table(rec)
        if uses_records:
            problems += feature_problems(list(df.columns), data, where=rec.name)
        used = {data.id_column, data.label_column, *data.numeric, *data.categorical}
        report["ignored_columns"] = [c for c in df.columns if c not in used]
        if labels and data.label_column in df.columns:
            all_labels += df[data.label_column].tolist()
        elif labels:
            problems.append(f"{rec.name} has no label column {data.label_column!r}")
    if img.is_file():
        df = read_table(img)
        if labels and data.label_column in df.columns:
            all_labels += df[data.label_column].tolist()
        if uses_images and "image" in df.columns:
            paths = [p if Path(p).is_absolute() else site_dir / p
                     for p in df["image"].dropna().astype(str).str.strip() if p]
            more, report["channels"] = _channel_problem([Path(p) for p in paths], data)
            problems += more
    if rec is None and not img.is_file():
        problems.append(f"{site_dir} has no records.csv, records.parquet or images.csv")
    if labels:
        more, report["absent_classes"] = _label_problem(all_labels, data, site_dir.name)
        problems += more
    if problems:
        raise DataMismatch(f"site {site_dir.name!r} does not fit the model:\n  - " + "\n  - ".join(problems))
    return report
