"""UCI Heart Disease (four hospitals, records only) → one site folder per hospital.

The original ``processed.<site>.data`` files: comma-separated, no header, ``?`` for missing.
Each line becomes one patient with a synthetic id ``<site>-<line number>`` (the source has
no ids); the target is binary, ``disease`` when ``num > 0``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fedmed.data.importers import (
    DatasetImportError,
    ImportReport,
    write_dataset_config,
)

__all__ = ["HEART_CATEGORICAL", "HEART_CLASSES", "HEART_COLUMNS", "HEART_NUMERIC",
           "HEART_SITES", "import_heart_disease"]

HEART_SITES = ["cleveland", "hungarian", "switzerland", "va"]
HEART_COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach",
                 "exang", "oldpeak", "slope", "ca", "thal", "num"]
HEART_CLASSES = ["no_disease", "disease"]
HEART_NUMERIC = ["age", "trestbps", "chol", "thalach", "oldpeak", "ca"]
HEART_CATEGORICAL: dict[str, list[str]] = {
    "sex": ["0", "1"],
    "cp": ["1", "2", "3", "4"],
    "fbs": ["0", "1"],
    "restecg": ["0", "1", "2"],
    "exang": ["0", "1"],
    "slope": ["1", "2", "3"],
    "thal": ["3", "6", "7"],
}
# A recorded 0 for cholesterol or resting blood pressure is not physiological: the source
# uses it as "not measured" (all of Switzerland's chol values are 0). Treat it as missing.
_ZERO_MEANS_MISSING = ("chol", "trestbps")


def _parse_file(path: Path, site: str) -> pd.DataFrame:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetImportError(f"{path}: not a UTF-8/ASCII text file") from None
    rows: list[dict[str, object]] = []
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(HEART_COLUMNS):
            raise DatasetImportError(
                f"{path} line {lineno}: {len(fields)} fields, expected {len(HEART_COLUMNS)}"
            )
        values: dict[str, float | None] = {}
        for col, raw in zip(HEART_COLUMNS, fields, strict=True):
            if raw in ("?", ""):
                values[col] = None
                continue
            try:
                val = float(raw)
            except ValueError:
                raise DatasetImportError(
                    f"{path} line {lineno}: column {col!r} is not a number or '?'"
                ) from None
            if not math.isfinite(val):
                raise DatasetImportError(f"{path} line {lineno}: column {col!r} is not finite")
            values[col] = val
        rows.append(_to_record(values, path=path, lineno=lineno, site=site))
    if not rows:
        raise DatasetImportError(f"{path}: no data lines")
    return pd.DataFrame(rows)


def _to_record(values: dict[str, float | None], *, path: Path, lineno: int,
               site: str) -> dict[str, object]:
    num = values["num"]
    if num is None or num < 0 or num != int(num):
        raise DatasetImportError(
            f"{path} line {lineno}: column 'num' must be an integer >= 0 (the diagnosis)"
        )
    rec: dict[str, object] = {
        "patient_id": f"{site}-{lineno}",
        "label": HEART_CLASSES[1] if num > 0 else HEART_CLASSES[0],
    }
    for col in HEART_NUMERIC:
        val = values[col]
        if col in _ZERO_MEANS_MISSING and val == 0:
            val = None
        rec[col] = val
    for col, vocab in HEART_CATEGORICAL.items():
        val = values[col]
        if val is None:
            rec[col] = None
            continue
        text = str(int(val)) if val == int(val) else None
        if text not in vocab:
            raise DatasetImportError(
                f"{path} line {lineno}: column {col!r} is outside its allowed values {vocab}"
            )
        rec[col] = text
    return rec


def import_heart_disease(src: str | Path, out: str | Path) -> ImportReport:
    """Import the four UCI files in ``src`` into ``<out>/<hospital>/records.csv``.

    Numeric: age, trestbps, chol, thalach, oldpeak, ca (0 chol/trestbps → missing).
    Categorical values are integer strings (``"1"``). Writes ``<out>/fedmed-data.yaml``.
    Raises :class:`DatasetImportError` naming the file (and line) when a file is absent,
    a line has the wrong field count, a value is not numeric, or a code is unknown.
    """
    src, out = Path(src), Path(out)
    paths = {site: src / f"processed.{site}.data" for site in HEART_SITES}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        raise DatasetImportError(f"UCI heart-disease file(s) not found: {', '.join(absent)}")
    report = ImportReport(out_dir=out, classes=list(HEART_CLASSES))
    tables = {site: _parse_file(path, site) for site, path in paths.items()}
    for site, records in tables.items():
        report.add_site(site, records=records, images=None)
    report.config_path = write_dataset_config(
        out,
        classes=HEART_CLASSES,
        numeric=HEART_NUMERIC,
        categorical=HEART_CATEGORICAL,
        channels=1,
        image_size=64,
        comment="UCI Heart Disease (Janosi, Steinbrunn, Pfisterer, Detrano; CC BY 4.0).\n"
        "Records only; patient ids are synthetic (<site>-<line>). chol/trestbps 0 = missing.",
    )
    return report.verify()
