"""Importers: turn a published or local dataset into fedmed's on-disk site layout.

Every importer writes one folder per site (``records.csv``, optional ``images.csv``, optional
``images/``; see ``docs/architecture.md``) plus ``fedmed-data.yaml``, the ``data:`` section a
config needs for that dataset, and returns an :class:`ImportReport` of per-site counts.

Importers are a string registry (:data:`IMPORTERS`, :func:`get_importer`) so the CLI can pick
one by name. Messages here name files, columns, line numbers and counts — never patient ids
or raw rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fedmed.errors import FedmedError, UsageError

__all__ = [
    "read_source_csv",
    "IMPORTERS",
    "DatasetImportError",
    "ImportReport",
    "DATA_CONFIG_NAME",
    "check_site_name",
    "get_importer",
    "import_folder",
    "import_ham10000",
    "import_heart_disease",
    "site_summary",
    "synthesize",
    "write_dataset_config",
    "write_site",
]

DATA_CONFIG_NAME = "fedmed-data.yaml"
_SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # same rule as SiteConfig.site


class DatasetImportError(FedmedError, ValueError):
    """A source dataset is missing, malformed or inconsistent; the message names the file."""


@dataclass
class ImportReport:
    """What an importer wrote: per-site patient/image counts and label mix.

    ``sites[name]`` holds ``patients`` (distinct patient ids), ``records`` (record rows),
    ``images`` (image rows) and ``label_counts`` (samples per class, where a sample is an
    image, or a record-only patient — the unit the Dataset yields).
    """

    out_dir: Path
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    config_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def add_site(self, site: str, *, records: pd.DataFrame | None, images: pd.DataFrame | None) -> Path:
        """Write one site folder under ``out_dir`` and record its summary row."""
        path = write_site(self.out_dir, site, records=records, images=images)
        self.sites[site] = site_summary(records, images)
        return path

    def verify(self) -> ImportReport:
        """Load every written site with the written config, as training will.

        Importers call this last, so an import never leaves a set that loading refuses: the
        loader's own problems (file, column, lines, counts) become the import's error.
        """
        from fedmed.config import ConfigError, load_config
        from fedmed.data.site import SiteDataError, load_site

        if self.config_path is None:
            return self
        try:
            data_cfg = load_config(self.config_path).data
        except ConfigError as exc:
            raise DatasetImportError(f"the written {DATA_CONFIG_NAME} is not a valid config: {exc}") from None
        for site in self.sites:
            try:
                load_site(Path(self.out_dir) / site, data_cfg, name=site)
            except SiteDataError as exc:
                raise DatasetImportError(f"the import cannot represent this input; loading site "
                                         f"{site!r} as written refuses it: {exc}") from None
        return self

    def table(self) -> str:
        """An aligned per-site table (counts only) with a total row, for printing."""
        classes = list(self.classes) or sorted(
            {c for s in self.sites.values() for c in s.get("label_counts", {})}
        )
        head = ["site", "patients", "records", "images", *classes]
        rows: list[list[str]] = []
        totals = [0] * (3 + len(classes))
        for name, info in self.sites.items():
            counts = info.get("label_counts", {})
            vals = [int(info.get("patients", 0)), int(info.get("records", 0)),
                    int(info.get("images", 0)), *(int(counts.get(c, 0)) for c in classes)]
            totals = [t + v for t, v in zip(totals, vals, strict=True)]
            rows.append([name, *map(str, vals)])
        if len(rows) > 1:
            rows.append(["total", *map(str, totals)])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True)))

        lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
        return "\n".join(lines)


def read_source_csv(path: Path, *, what: str = "table") -> pd.DataFrame:
    """A source CSV as strings, blank lines kept so the index maps to file lines in messages.

    Strings throughout: ids like "007" and codes like "1" keep their spelling.
    """
    if not path.is_file():
        raise DatasetImportError(f"{what} not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetImportError(f"{path}: not a readable CSV ({type(exc).__name__})") from None


def site_summary(records: pd.DataFrame | None, images: pd.DataFrame | None) -> dict[str, Any]:
    """Counts for one site: patients, records, images and samples per label.

    A sample is one image row (labelled by its own ``label``, else its patient's record)
    or one record-only patient — matching how ``fedmed.data.site`` builds samples.
    """
    rec_ids = set() if records is None else set(records["patient_id"].astype(str))
    img_ids = set() if images is None else set(images["patient_id"].astype(str))
    labels: list[str] = []
    rec_label: dict[str, str] = {}
    if records is not None and "label" in records.columns:
        rec_label = {p: str(lab) for p, lab in zip(records["patient_id"].astype(str),
                                                   records["label"], strict=True) if pd.notna(lab) and lab != ""}
    if images is not None:
        own = images["label"] if "label" in images.columns else pd.Series([None] * len(images))
        for pid, lab in zip(images["patient_id"].astype(str), own, strict=True):
            has_own = pd.notna(lab) and str(lab) != ""
            labels.append(str(lab) if has_own else rec_label.get(pid, "None"))
    labels.extend(rec_label[p] for p in rec_label if p not in img_ids)
    counts = pd.Series(labels, dtype=object).value_counts()
    return {
        "patients": len(rec_ids | img_ids),
        "records": 0 if records is None else len(records),
        "images": 0 if images is None else len(images),
        "label_counts": {str(k): int(v) for k, v in counts.items()},
    }


def _check_columns(df: pd.DataFrame, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetImportError(f"{what} is missing required column(s) {missing}")


def check_site_name(site_name: str) -> str:
    """Return ``site_name`` if it is a usable site folder name, else raise (same rule as
    ``SiteConfig.site``), so importers can validate every site before writing any."""
    if not _SITE_NAME.match(str(site_name)) or str(site_name) in (".", ".."):
        raise DatasetImportError(
            f"site name {site_name!r} is not a valid folder name (letters, digits, _ . - only)"
        )
    return str(site_name)


def write_site(
    out_dir: str | Path,
    site_name: str,
    *,
    records: pd.DataFrame | None = None,
    images: pd.DataFrame | None = None,
) -> Path:
    """Write one site folder ``<out_dir>/<site_name>/`` per the on-disk contract.

    ``records`` needs ``patient_id`` (one row per patient) and ``label`` unless ``images``
    carry every patient's labels; ``images`` needs ``image`` and ``patient_id`` (``label``
    optional: it is that image's label). Missing values become empty cells.
    A stale ``records.csv``/``images.csv`` from an earlier import is removed when that table
    is ``None`` now, so the folder always matches what was imported. Returns the site folder.
    """
    check_site_name(site_name)
    if records is None and images is None:
        raise DatasetImportError(f"site {site_name!r}: nothing to write (no records, no images)")
    site_dir = Path(out_dir) / site_name
    site_dir.mkdir(parents=True, exist_ok=True)
    if (site_dir / "records.parquet").exists():
        raise DatasetImportError(
            f"{site_dir / 'records.parquet'} exists and would shadow the new records.csv; "
            "import into an empty folder"
        )
    for name, table, required in (
        ("records.csv", records, ["patient_id"] + (["label"] if images is None else [])),
        ("images.csv", images, ["image", "patient_id"]),
    ):
        path = site_dir / name
        if table is None:
            path.unlink(missing_ok=True)
            continue
        _check_columns(table, required, f"site {site_name!r} {name}")
        if name == "records.csv":
            dup = int(table["patient_id"].astype(str).duplicated().sum())
            if dup:
                raise DatasetImportError(
                    f"site {site_name!r} records.csv: {dup} patient id(s) on more than one row "
                    "(records hold one row per patient)"
                )
        front = [c for c in required + ["label"] if c in table.columns]
        front = list(dict.fromkeys(front))
        table = table[front + [c for c in table.columns if c not in front]]
        table.to_csv(path, index=False, na_rep="")
    return site_dir


def write_dataset_config(
    out_dir: str | Path,
    *,
    classes: Sequence[str],
    numeric: Sequence[str] = (),
    categorical: Mapping[str, Sequence[str]] | None = None,
    notes_column: str | None = None,
    channels: int = 1,
    image_size: int = 64,
    ignore_columns: Sequence[str] = (),
    sites: Sequence[str] | None = None,
    image_roots: Sequence[str | Path] = (),
    comment: str | None = None,
) -> Path:
    """Write ``<out_dir>/fedmed-data.yaml``: the ``data:`` section for this dataset.

    ``image_roots`` names the folders outside the site folders that ``images.csv`` points
    into (the loader refuses any other outside path). ``root: "."`` resolves against the file's
    own folder (``load_config`` does that), so the file is itself a minimal valid config and its
    ``data:`` block can be pasted into another.
    Category values are written as strings so ``1`` stays ``"1"`` and matches the CSV cells.
    """
    data: dict[str, Any] = {"root": "."}
    if sites is not None:
        data["sites"] = [str(s) for s in sites]
    data["classes"] = [str(c) for c in classes]
    data["numeric"] = [str(c) for c in numeric]
    data["categorical"] = {str(k): [str(v) for v in vals]
                           for k, vals in (categorical or {}).items()}
    data["notes_column"] = notes_column
    if ignore_columns:
        data["ignore_columns"] = [str(c) for c in ignore_columns]
    data["channels"] = int(channels)
    data["image_size"] = int(image_size)
    if image_roots:  # images.csv points outside the site folders: allow exactly these folders
        data["image_roots"] = [str(Path(r).resolve()) for r in image_roots]
    header = "# Written by fedmed.data.importers; the `data:` section for this dataset.\n"
    if comment:
        header += "".join(f"# {line}\n" for line in comment.splitlines())
    path = Path(out_dir) / DATA_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump({"data": data}, sort_keys=False,
                                            default_flow_style=None, width=100))
    return path


# The importer modules import the helpers above, so they are imported after them.
from fedmed.data.importers.folder import import_folder  # noqa: E402
from fedmed.data.importers.ham10000 import import_ham10000  # noqa: E402
from fedmed.data.importers.heart_disease import import_heart_disease  # noqa: E402
from fedmed.data.importers.synth import synthesize  # noqa: E402

IMPORTERS: dict[str, Callable[..., ImportReport]] = {
    "ham10000": import_ham10000,
    "heart-disease": import_heart_disease,
    "folder": import_folder,
    "synth": synthesize,
}


def get_importer(name: str) -> Callable[..., ImportReport]:
    """Look up an importer by name; an unknown name raises ``ValueError`` listing valid ones."""
    try:
        return IMPORTERS[name]
    except KeyError:
        raise UsageError(
            f"unknown importer {name!r}; valid names: {', '.join(sorted(IMPORTERS))}"
        ) from None
