"""Load and validate one site folder (see ``docs/architecture.md``) into samples + records.

Validation collects every problem in the folder and raises one :class:`SiteDataError`
listing them, each naming the file (by its name in the site folder), column, 1-based line
numbers and counts — never a patient id, a cell value, an image file name or an absolute
path. Image paths must resolve inside the site folder, symlinks included, unless the
config's ``image_roots`` allows an outside folder.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmed.config import DataConfig
from fedmed.data.records import RecordEncoder, RecordError, normalise_value, read_table, to_numeric
from fedmed.data.splits import SPLIT_NAMES
from fedmed.errors import FedmedError, UsageError

__all__ = ["SiteDataError", "LoadSummary", "SiteData", "load_site", "combine_sites"]

_SHOW = 10  # line numbers / paths shown per problem
_SPLIT = "split"  # the samples column that holds data.split_column's side
# image_line: the image's 1-based line in images.csv, so image errors can say where a file is
# listed instead of naming it (file names are often built from patient ids).
SAMPLE_COLUMNS = ["patient_id", "image_path", "label", "has_image", "has_record", "site",
                  "image_line"]


class SiteDataError(FedmedError, ValueError):
    """A site folder breaks the on-disk contract; the message lists every problem found."""


@dataclass
class LoadSummary:
    """Counts for a loaded site. ``both``/``image_only``/``record_only`` count patients."""

    site: str
    patients: int = 0
    images: int = 0
    samples: int = 0
    both: int = 0
    image_only: int = 0
    record_only: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    missing_values: dict[str, int] = field(default_factory=dict)
    unknown_categories: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A readable two-column table (counts only) for printing."""
        rows: list[tuple[str, str]] = [("site", self.site)]
        rows += [(k, str(getattr(self, k))) for k in ("patients", "images", "samples")]
        rows += [("  with image + record", str(self.both)), ("  image only", str(self.image_only)),
                 ("  record only", str(self.record_only)), ("samples per label", "")]
        rows += [(f"  {k}", str(v)) for k, v in self.label_counts.items()]
        if self.missing_values:
            rows.append(("missing values", ""))
            rows += [(f"  {k}", str(v)) for k, v in self.missing_values.items()]
        unknown = {k: v for k, v in self.unknown_categories.items() if v}
        rows.append(("unknown categories", "" if unknown else "none"))
        rows += [(f"  {k}", str(v)) for k, v in unknown.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)

    @classmethod
    def merge(cls, parts: list[LoadSummary], *, site: str) -> LoadSummary:
        """Sum counts over sites (patients never collide once prefixed by site)."""
        out = cls(site=site)
        for p in parts:
            for k in ("patients", "images", "samples", "both", "image_only", "record_only"):
                setattr(out, k, getattr(out, k) + getattr(p, k))
            for k in ("label_counts", "missing_values", "unknown_categories"):
                merged = dict(getattr(out, k))
                for key, n in getattr(p, k).items():
                    merged[key] = merged.get(key, 0) + int(n)
                setattr(out, k, merged)
        return out


@dataclass
class SiteData:
    """One site: ``samples`` (one row per sample) and ``records`` (indexed by patient id)."""

    name: str
    site_dir: Path
    samples: pd.DataFrame
    records: pd.DataFrame
    summary: LoadSummary


def _lines(index: pd.Index) -> str:
    word = ("row" if index.name == "row" else "line") + ("s" if len(index) > 1 else "")
    shown = ", ".join(str(i) for i in list(index[:_SHOW]))
    more = f" and {len(index) - _SHOW} more" if len(index) > _SHOW else ""
    return f"{word} {shown}{more}"


def _ids(col: pd.Series) -> pd.Series:
    """Patient ids as stripped strings ("007" stays "007"); empty → NaN."""
    if pd.api.types.is_numeric_dtype(col):
        return col.map(normalise_value).astype(object)
    out = col.astype("string").str.strip().astype(object)
    return out.where(out.notna() & (out != ""), np.nan)


def _labels(col: pd.Series) -> pd.Series:
    return col.map(normalise_value).astype(object)


def _check_labels(df: pd.DataFrame, col: str, classes: dict[str | None, int], path: Path,
                  problems: list[str], *, allow_empty: bool) -> pd.Series:
    labels = _labels(df[col])
    if not allow_empty and labels.isna().any():
        problems.append(f"{path.name}: column {col!r} is empty on {int(labels.isna().sum())} "
                        f"row(s) ({_lines(df.index[labels.isna()])})")
    bad = labels.notna() & ~labels.isin(list(classes))
    if bad.any():
        # The values are not shown: a wrong column (the id column as label) would list ids.
        problems.append(f"{path.name}: column {col!r} has {int(bad.sum())} label(s) not in "
                        f"data.classes {list(classes)} ({int(labels[bad].nunique())} distinct "
                        f"value(s); {_lines(df.index[bad])})")
    return labels


def _check_columns(df: pd.DataFrame, required: list[str], allowed: list[str], path: Path,
                   cfg: DataConfig, problems: list[str]) -> bool:
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append(f"{path.name}: missing required column(s) {missing}")
    extra = [str(c)[:40] for c in df.columns if c not in allowed and c not in cfg.ignore_columns]
    if extra:
        problems.append(f"{path.name}: column(s) {extra} are not in the config; add them to "
                        "`data.ignore_columns` to skip them (or to data.numeric / "
                        "data.categorical to use them)")
    return not missing


def _load_records(path: Path, cfg: DataConfig, classes: dict[str | None, int], problems: list[str],
                  *, images: bool) -> tuple[pd.DataFrame, pd.Series, pd.Series] | None:
    """Records indexed by patient id, their labels and their file lines.

    ``label`` is required only when the site has no ``images.csv``: with images, each image
    carries its own label and the records' label (if any) is a patient-level fallback.
    """
    df = read_table(path, keep=[cfg.id_column])
    if _header_only(df, path, problems):
        return None
    idc, labc = cfg.id_column, cfg.label_column
    features = [*cfg.numeric, *cfg.categorical] + ([cfg.notes_column] if cfg.notes_column else [])
    required = list(dict.fromkeys([idc, *([] if images else [labc]), *features]))
    allowed = list(dict.fromkeys([idc, labc, *features, *([cfg.split_column] if cfg.split_column else [])]))
    complete = _check_columns(df, required, allowed, path, cfg, problems)
    ids = _ids(df[idc]) if idc in df.columns else None
    if ids is not None and ids.isna().any():
        problems.append(f"{path.name}: column {idc!r} is empty on {int(ids.isna().sum())} row(s) "
                        f"({_lines(df.index[ids.isna()])})")
    dup = ids.notna() & ids.duplicated(keep=False) if ids is not None else None
    if ids is not None and dup is not None and dup.any():
        problems.append(f"{path.name}: {int(ids[dup].nunique())} patient id(s) in column {idc!r} "
                        f"appear on more than one row ({int(dup.sum())} rows: "
                        f"{_lines(df.index[dup])}); records hold one row per patient")
    labels = (_check_labels(df, labc, classes, path, problems, allow_empty=images)
              if labc in df.columns else pd.Series(np.nan, index=df.index, dtype=object))
    if ids is not None:
        _check_id_spelling(ids, path, idc, problems)
    for col in (c for c in cfg.numeric if c in df.columns):
        bad = df[col].notna() & to_numeric(df[col]).isna()
        bad &= df[col].astype("string").str.strip().fillna("") != ""
        if bad.any():
            problems.append(f"{path.name}: numeric column {col!r} has {int(bad.sum())} value(s) that "
                            f"are not finite numbers ({_lines(df.index[bad])})")
        _check_range(to_numeric(df[col]), df.index, col, cfg, path, problems)
    if not complete or ids is None:
        return None
    out = pd.DataFrame(index=pd.Index(ids.to_numpy(), name="patient_id"))
    for col in features:
        out[col] = to_numeric(df[col]).to_numpy() if col in cfg.numeric else df[col].to_numpy()
    if cfg.split_column and cfg.split_column in df.columns:
        out[_SPLIT] = _check_split_values(df, cfg.split_column, path, problems).to_numpy()
    return (out, pd.Series(labels.to_numpy(), index=out.index),
            pd.Series(df.index.to_numpy(), index=out.index, name=df.index.name))


_HUGE = 1e9  # |value| beyond this, in a column without a configured range, is an export error


def _check_range(values: pd.Series, lines: pd.Index, col: str, cfg: DataConfig, path: Path,
                 problems: list[str]) -> None:
    """Values outside ``data.ranges[col]`` (or beyond +-1e9 without one) are problems."""
    lo, hi = cfg.ranges.get(col, (-_HUGE, _HUGE))
    bad = values.notna() & ((values < lo) | (values > hi))
    if bad.any():  # the bounds are config, not data: they may be shown; the values may not
        what = (f"outside data.ranges [{lo:g}, {hi:g}]" if col in cfg.ranges
                else f"beyond +-{_HUGE:g} (set data.ranges.{col} if such values are real)")
        problems.append(f"{path.name}: numeric column {col!r} has {int(bad.sum())} value(s) {what} "
                        f"({_lines(lines[bad.to_numpy()])})")


_SCI = r"^[+-]?\d(\.\d+)?[eE][+-]?\d+$"


def _check_id_spelling(ids: pd.Series, path: Path, idc: str, problems: list[str]) -> None:
    """Ids a spreadsheet has mangled: scientific notation, or "7" next to "7.0" in one table."""
    text = ids.dropna().astype(str)
    sci = text.str.match(_SCI)
    if sci.any():
        problems.append(f"{path.name}: {int(sci.sum())} id(s) in column {idc!r} are in scientific "
                        "notation, as a spreadsheet writes long numbers (digits may be lost; "
                        f"export ids as text) ({_lines(text.index[sci])})")
    as_num = text.map(normalise_value)
    clash = as_num.duplicated(keep=False) & ~text.duplicated(keep=False)
    if clash.any():
        problems.append(f"{path.name}: {int(clash.sum())} id(s) in column {idc!r} differ only in "
                        "how a number is written (7 vs 7.0 vs 007): one patient or several? "
                        f"({_lines(text.index[clash])})")


def _header_only(df: pd.DataFrame, path: Path, problems: list[str]) -> bool:
    if len(df) == 0:
        problems.append(f"{path.name}: the table has a header but no data rows (an empty export?)")
        return True
    return False


def _inside(path: str, roots: list[str]) -> bool:
    """Whether ``path``, with every symlink and '..' resolved, lies under one of ``roots``."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _load_images(path: Path, site_dir: Path, cfg: DataConfig, classes: dict[str | None, int],
                 rec_labels: pd.Series | None, problems: list[str]) -> pd.DataFrame | None:
    """``rec_labels`` None means the records could not be read: skip label cross-checks."""
    df = read_table(path, keep=[cfg.id_column, "image"])
    if _header_only(df, path, problems):
        return None
    idc, labc = cfg.id_column, cfg.label_column
    allowed = ["image", idc, labc, *([cfg.split_column] if cfg.split_column else [])]
    if not _check_columns(df, ["image", idc], allowed, path, cfg, problems):
        return None
    ids, files = _ids(df[idc]), df["image"].astype("string").str.strip()
    _check_id_spelling(ids, path, idc, problems)
    for col, vals in (("image", files.isna() | (files == "")), (idc, ids.isna())):
        if vals.any():
            problems.append(f"{path.name}: column {col!r} is empty on {int(vals.sum())} row(s) "
                            f"({_lines(df.index[vals])})")
    files = files.fillna("")
    full = [str(Path(f) if Path(f).is_absolute() else (site_dir / f).absolute()) if f else ""
            for f in files]
    roots = [os.path.realpath(site_dir), *(os.path.realpath(r) for r in cfg.image_roots)]
    outside = pd.Series([bool(p) and not _inside(p, roots) for p in full], index=df.index)
    if outside.any():
        problems.append(f"{path.name}: {int(outside.sum())} path(s) in column 'image' lead outside the "
                        f"site folder (absolute, '..' or a symlink) ({_lines(df.index[outside])}); a "
                        "folder outside it must be listed in the config's image_roots")
    absent = pd.Series([bool(p) and not out and not os.path.isfile(p) for p, out in zip(full, outside, strict=True)],
                       index=df.index)
    if absent.any():
        problems.append(f"{path.name}: {int(absent.sum())} image file(s) in column 'image' do not exist "
                        f"({_lines(df.index[absent])})")
    own = (_check_labels(df, labc, classes, path, problems, allow_empty=True)
           if labc in df.columns else pd.Series(np.nan, index=df.index, dtype=object))
    # An image's own label is that image's (sample's) label: follow-up images of one patient
    # may show different findings. The records' label only fills images that carry none.
    lookup = {} if rec_labels is None else dict(zip(rec_labels.index, rec_labels, strict=True))
    rec = pd.Series([lookup.get(i) for i in ids], index=df.index, dtype=object)
    orphan = own.isna() & rec.isna() & ids.notna() & (rec_labels is not None)
    if orphan.any():
        problems.append(f"{path.name}: {int(orphan.sum())} image row(s) have no {labc!r} and no "
                        f"record label to take it from ({_lines(df.index[orphan])})")
    label = own.where(own.notna(), rec)
    out = pd.DataFrame({"patient_id": ids.to_numpy(), "image_path": full,
                        "label": label.to_numpy(), "image_line": df.index.to_numpy()})
    if cfg.split_column and cfg.split_column in df.columns:
        out[_SPLIT] = _check_split_values(df, cfg.split_column, path, problems).to_numpy()
    return out


def _check_unlabelled_patients(path: Path, cfg: DataConfig, labels: pd.Series, lines: pd.Series,
                               images: pd.DataFrame | None, problems: list[str]) -> None:
    """A record-only patient (no image rows) needs the records' label: it is its only sample."""
    with_images = set() if images is None else set(images["patient_id"].dropna())
    bare = labels.isna() & ~labels.index.isin(list(with_images))
    if bare.any():
        where = pd.Index(lines[bare].to_numpy(), name=lines.name)
        problems.append(f"{path.name}: {int(bare.sum())} patient(s) have no {cfg.label_column!r} "
                        f"in the records and no image in images.csv to carry one ({_lines(where)})")


def _check_split_values(df: pd.DataFrame, col: str, path: Path, problems: list[str]) -> pd.Series:
    """The split column as lower-case train/val/test; empty and unknown cells are problems."""
    vals = df[col].astype("string").str.strip().str.lower()
    empty = vals.isna() | (vals == "")
    if empty.any():
        problems.append(f"{path.name}: split column {col!r} is empty on {int(empty.sum())} row(s) "
                        f"({_lines(df.index[empty])})")
    bad = ~empty & ~vals.isin(SPLIT_NAMES)
    if bad.any():  # the values are not shown (the column may be a wrong one, ids say)
        problems.append(f"{path.name}: split column {col!r} has {int(bad.sum())} value(s) that are "
                        f"not one of {list(SPLIT_NAMES)} ({_lines(df.index[bad])})")
    return vals.where(~empty & ~bad).astype(object)


def _check_split(cfg: DataConfig, rec_path: Path | None, records: pd.DataFrame | None,
                 rec_lines: pd.Series | None, img_path: Path, images: pd.DataFrame | None,
                 problems: list[str]) -> pd.Series | None:
    """Each patient's side from ``data.split_column``; None when the column is not set.

    A patient on two sides (images that disagree, or images vs records), a record-only
    patient without a side, or a column found in neither table is a problem naming lines.
    """
    col = cfg.split_column
    if not col:
        return None
    in_rec = records is not None and _SPLIT in records.columns
    in_img = images is not None and _SPLIT in images.columns
    if not in_rec and not in_img:
        where = " or ".join(p.name for p in (rec_path, img_path if images is not None else None) if p)
        problems.append(f"data.split_column {col!r} is set but {where} has no such column")
        return None
    side: dict[Hashable, str] = {}  # patient id → side
    if in_img and images is not None:
        per = images.dropna(subset=["patient_id"]).groupby("patient_id")[_SPLIT]
        split_ids = per.nunique()
        split_ids = split_ids.index[split_ids > 1]
        if len(split_ids):
            rows = images.index[images["patient_id"].isin(split_ids)]
            problems.append(f"{img_path.name}: {len(split_ids)} patient(s) have images on more than "
                            f"one side of split column {col!r} "
                            f"({_lines(pd.Index(images.loc[rows, 'image_line'], name='line'))})")
        side.update({p: v for p, v in per.first().items() if isinstance(v, str)})
    if in_rec and records is not None and rec_path is not None and rec_lines is not None:
        rec_side = records[_SPLIT]
        clash = pd.Series([isinstance(v, str) and p in side and side[p] != v
                           for p, v in rec_side.items()], index=rec_side.index)
        if clash.any():
            problems.append(f"{rec_path.name}: split column {col!r} puts {int(clash.sum())} "
                            f"patient(s) on another side than their images in {img_path.name} "
                            f"({_lines(pd.Index(rec_lines[clash].to_numpy(), name=rec_lines.name))})")
        side.update({p: v for p, v in rec_side.items() if isinstance(v, str) and p not in side})
    elif records is not None and len(records) and rec_path is not None and rec_lines is not None:
        with_images = set() if images is None else set(images["patient_id"].dropna())
        bare = ~records.index.isin(list(with_images))
        if bare.any():
            problems.append(f"{rec_path.name}: {int(bare.sum())} record-only patient(s) have no side: "
                            f"split column {col!r} is only in {img_path.name} "
                            f"({_lines(pd.Index(rec_lines[bare].to_numpy(), name=rec_lines.name))})")
    return pd.Series(side, dtype=object)


def _records_path(site_dir: Path) -> Path | None:
    found = [site_dir / n for n in ("records.csv", "records.parquet") if (site_dir / n).is_file()]
    if len(found) > 1:
        raise SiteDataError(f"site folder {site_dir.name!r}: both records.csv and records.parquet exist; keep one")
    return found[0] if found else None


def load_site(site_dir: str | Path, data_cfg: DataConfig, *, name: str | None = None) -> SiteData:
    """Read and validate ``records.*`` and/or ``images.csv`` in ``site_dir``.

    Image-only and record-only patients are kept (``has_record`` / ``has_image`` False).
    Raises :class:`SiteDataError` listing every problem (file, column, line numbers, counts).
    """
    site_dir = Path(site_dir).expanduser().absolute()
    if not site_dir.is_dir():
        raise SiteDataError(f"site folder not found: {site_dir.name!r}")
    name = name or site_dir.name
    rec_path, img_path = _records_path(site_dir), site_dir / "images.csv"
    if rec_path is None and not img_path.is_file():
        raise SiteDataError(f"site folder {site_dir.name!r}: no records.csv, records.parquet or images.csv "
                            "(see docs/architecture.md for the site folder layout)")
    classes = {normalise_value(c): i for i, c in enumerate(data_cfg.classes)}
    problems: list[str] = []
    try:
        loaded = (_load_records(rec_path, data_cfg, classes, problems, images=img_path.is_file())
                  if rec_path else None)
        records, rec_labels, rec_lines = loaded if loaded else (None, None, None)
        if rec_path is None:  # image-only site: labels must come from images.csv
            rec_labels = pd.Series(dtype=object)
        images = (_load_images(img_path, site_dir, data_cfg, classes, rec_labels, problems)
                  if img_path.is_file() else None)
        if rec_path is not None and rec_labels is not None and rec_lines is not None:
            _check_unlabelled_patients(rec_path, data_cfg, rec_labels, rec_lines, images, problems)
        sides = _check_split(data_cfg, rec_path, records, rec_lines, img_path, images, problems)
    except RecordError as exc:
        raise SiteDataError(str(exc)) from None
    if problems:
        raise SiteDataError(f"site {name!r}: {len(problems)} problem(s):\n  - "
                            + "\n  - ".join(problems))
    if records is None or rec_labels is None:
        feats = [*data_cfg.numeric, *data_cfg.categorical]
        feats += [data_cfg.notes_column] if data_cfg.notes_column else []
        records = pd.DataFrame(columns=feats, index=pd.Index([], name="patient_id", dtype=object))
        rec_labels = pd.Series(dtype=object)
    site = _assemble(name, site_dir, data_cfg, classes, records.drop(columns=[_SPLIT], errors="ignore"),
                     rec_labels, None if images is None else images.drop(columns=[_SPLIT],
                                                                           errors="ignore"))
    if sides is not None:
        site.samples[_SPLIT] = site.samples["patient_id"].map(sides).to_numpy()
        counts = site.samples[_SPLIT].value_counts()
        empty = [k for k in ("train", "test") if not counts.get(k, 0)]
        if empty:
            sizes = ", ".join(f"{k}: {int(counts.get(k, 0))}" for k in SPLIT_NAMES)
            raise SiteDataError(f"site {name!r}: split column {data_cfg.split_column!r} leaves the "
                                f"{' and '.join(empty)} side(s) empty ({sizes} samples)")
    return site


def _assemble(name: str, site_dir: Path, cfg: DataConfig, classes: dict[str | None, int],
              records: pd.DataFrame, rec_labels: pd.Series,
              images: pd.DataFrame | None) -> SiteData:
    rec_ids = set(records.index)
    img_ids = set(images["patient_id"]) if images is not None else set()
    parts = []
    if images is not None:
        parts.append(images.assign(has_image=True))
    only = [i for i in records.index if i not in img_ids]
    parts.append(pd.DataFrame({"patient_id": only, "image_path": None,
                               "label": rec_labels.loc[only].to_numpy(), "has_image": False}))
    samples = pd.concat(parts, ignore_index=True)
    samples["patient_id"] = samples["patient_id"].astype(str)
    samples["image_path"] = samples["image_path"].astype(object).where(samples["has_image"], None)
    samples["label"] = samples["label"].map(classes).astype(np.int64)
    samples["has_image"] = samples["has_image"].astype(bool)
    samples["has_record"] = samples["patient_id"].isin(rec_ids)
    samples["site"] = name
    samples["image_line"] = samples.get("image_line", pd.Series(pd.NA, index=samples.index)
                                        ).astype("Int64")
    samples = samples[SAMPLE_COLUMNS]
    counts = np.bincount(samples["label"].to_numpy(), minlength=len(cfg.classes))
    features = [*cfg.numeric, *cfg.categorical]
    unknown = RecordEncoder(numeric=[], categorical=cfg.categorical).unknown_counts(records)
    summary = LoadSummary(
        site=name, patients=len(rec_ids | img_ids),
        images=0 if images is None else len(images), samples=len(samples),
        both=len(rec_ids & img_ids), image_only=len(img_ids - rec_ids),
        record_only=len(rec_ids - img_ids),
        label_counts={c: int(n) for c, n in zip(cfg.classes, counts, strict=True)},
        missing_values={c: int(records[c].isna().sum()) for c in features},
        unknown_categories=unknown,
    )
    return SiteData(name=name, site_dir=site_dir, samples=samples, records=records,
                    summary=summary)


def combine_sites(sites: list[SiteData], name: str = "pooled") -> SiteData:
    """Pool sites: patient ids become ``"<site>/<id>"``; ``site`` keeps each sample's site."""
    if not sites:
        raise UsageError("combine_sites needs at least one site")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise UsageError(f"site names must be unique to pool them, got {names}")
    samples = pd.concat([s.samples.assign(patient_id=s.name + "/" + s.samples["patient_id"])
                         for s in sites], ignore_index=True)
    records = pd.concat([s.records.set_axis(s.name + "/" + s.records.index.astype(str))
                         for s in sites if len(s.records)] or [sites[0].records])
    records.index.name = "patient_id"
    root = Path(os.path.commonpath([str(s.site_dir) for s in sites]))
    summary = LoadSummary.merge([s.summary for s in sites], site=name)
    return SiteData(name=name, site_dir=root, samples=samples, records=records, summary=summary)
