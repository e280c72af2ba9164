"""The patient records table: reading it and encoding it for the model.

:class:`RecordEncoder` is fitted on TRAINING rows only (imputation medians, z-score stats,
KNN neighbours) so no validation/test value leaks into the inputs. Its state is plain
numbers, JSON-serialisable, and holds no patient rows unless asked to (KNN).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.impute import KNNImputer

from fedmed.errors import FedmedError

__all__ = [
    "RecordError",
    "read_table",
    "normalise_value",
    "to_numeric",
    "RecordEncoder",
]


class RecordError(FedmedError, ValueError):
    """A records table or encoder input is unusable; the message names file/column, not data."""


def _csv_lines(path: Path) -> list[int]:
    """1-based file line of each data row, as pandas reads them (quoted newlines included)."""
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        if next(reader, None) is None:
            return lines
        prev = reader.line_num
        for row in reader:
            if row and any(cell != "" for cell in row) or len(row) > 1:
                lines.append(prev + 1)
            prev = reader.line_num
    return lines


# pandas' default missing-value spellings; ids in ``keep`` columns are never read as missing.
_NA_TEXT = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                      "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                      "nan", "null"})


def read_table(path: str | Path, *, keep: Sequence[str] = ()) -> pd.DataFrame:
    """Read ``.csv`` (every cell a string, empty → NaN) or ``.parquet``.

    Columns in ``keep`` (ids, file paths) keep their text as written: only an empty cell is
    missing there, so a patient id "NA" or "None" stays an id. Elsewhere pandas' usual
    spellings ("NA", "n/a", "NULL", ...) read as missing.

    The index holds each row's 1-based line number in the file (CSV; the header is line 1)
    or row number (parquet), so errors can point at the row without quoting it. Column
    names are stripped of surrounding spaces. Raises :class:`RecordError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"table not found: {path.name!r}")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise RecordError(f"{path.name}: the file is empty (no header, no rows)")
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""],
                             encoding="utf-8-sig")
            kept = {str(c).strip() for c in keep}
            for col in df.columns:
                if str(col).strip() not in kept:
                    df[col] = df[col].where(~df[col].isin(_NA_TEXT))
            lines = _csv_lines(path)
            df.index = pd.Index(lines if len(lines) == len(df) else range(2, len(df) + 2),
                                name="line")
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
            df.index = pd.Index(range(1, len(df) + 1), name="row")
        else:
            raise RecordError(f"{path.name}: unsupported table type {suffix!r} (use .csv or .parquet)")
    except RecordError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError,
            ValueError) as exc:
        raise RecordError(f"{path.name}: not a readable table ({type(exc).__name__})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def normalise_value(value: Any) -> str | None:
    """A cell as a comparable string: stripped; ``1.0`` → ``"1"``; missing → None."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if not text:
        return None
    try:
        num = float(text)
    except ValueError:
        return text
    return str(int(num)) if num.is_integer() and abs(num) < 2**63 else text


def to_numeric(col: pd.Series) -> pd.Series:
    """Cells as float64; empty/missing → NaN and unparsable or non-finite cells → NaN too.

    Compare ``col.notna() & result.isna()`` to find the bad cells.
    """
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        out = col.astype("float64")
    else:
        out = pd.to_numeric(col.astype("string").str.strip(), errors="coerce").astype("float64")
    return out.where(np.isfinite(out))


class RecordEncoder:
    """Numeric (z-scored, imputed) and categorical (vocabulary index) features.

    ``cat`` index 0 is missing or out-of-vocabulary; 1..K is the value's position in the
    configured vocabulary. Fit on training rows only.
    """

    def __init__(self, *, numeric: list[str], categorical: dict[str, list[str]],
                 imputation: Literal["median", "knn"] = "median") -> None:
        if imputation not in ("median", "knn"):
            raise RecordError(f"imputation must be 'median' or 'knn', got {imputation!r}")
        self.numeric = list(numeric)
        self.categorical = {str(k): [str(v) for v in vals] for k, vals in categorical.items()}
        self.imputation = imputation
        self._vocab = {col: {normalise_value(v): i + 1 for i, v in enumerate(vals)}
                       for col, vals in self.categorical.items()}
        self.mean: list[float] = []
        self.std: list[float] = []
        self.median: list[float] = []
        self._knn: KNNImputer | None = None
        self._knn_rows: list[list[float | None]] | None = None
        self.fitted = False

    @property
    def cardinalities(self) -> list[int]:
        """Embedding sizes: vocabulary size + 1 (index 0) per categorical column."""
        return [len(v) + 1 for v in self.categorical.values()]

    def _check_columns(self, df: pd.DataFrame, cols: list[str]) -> None:
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise RecordError(f"records are missing column(s) {missing}")

    def _numeric(self, df: pd.DataFrame) -> np.ndarray:
        self._check_columns(df, self.numeric)
        if not self.numeric:
            return np.zeros((len(df), 0), dtype=np.float64)
        return np.stack([to_numeric(df[c]).to_numpy() for c in self.numeric], axis=1)

    def fit(self, df: pd.DataFrame) -> RecordEncoder:
        """Learn medians, means and stds (and KNN neighbours) from TRAINING rows."""
        self._check_columns(df, list(self.categorical))
        x = self._numeric(df)
        self.mean, self.std, self.median = [], [], []
        for j in range(x.shape[1]):
            col = x[:, j][~np.isnan(x[:, j])]
            if col.size == 0:
                mean, std, med = 0.0, 1.0, 0.0
            else:
                mean, std, med = float(col.mean()), float(col.std()), float(np.median(col))
                std = std if std > 1e-12 else 1.0
            self.mean.append(mean)
            self.std.append(std)
            self.median.append(med)
        self._knn, self._knn_rows = None, None
        if self.imputation == "knn" and x.shape[1]:
            z = self._zscore(x)
            self._fit_knn(z)
            self._knn_rows = [[None if math.isnan(v) else float(v) for v in row] for row in z]
        self.fitted = True
        return self

    def _fit_knn(self, z: np.ndarray) -> None:
        if len(z) == 0:
            return
        self._knn = KNNImputer(n_neighbors=min(5, len(z)), keep_empty_features=True).fit(z)

    def _zscore(self, x: np.ndarray) -> np.ndarray:
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def transform(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """``num`` float32 (N, n_num), ``num_missing`` bool (N, n_num), ``cat`` int64 (N, n_cat)."""
        if not self.fitted:
            raise RecordError("RecordEncoder.transform called before fit / load_state_dict")
        x = self._numeric(df)
        missing = np.isnan(x)
        z = self._zscore(x) if x.shape[1] else x
        if missing.any():
            if self._knn is not None:
                z = self._knn.transform(z)
            else:
                med_z = (np.asarray(self.median) - np.asarray(self.mean)) / np.asarray(self.std)
                z = np.where(missing, med_z, z)
        return {"num": z.astype(np.float32), "num_missing": missing, "cat": self._categorical(df)}

    def _categorical(self, df: pd.DataFrame) -> np.ndarray:
        self._check_columns(df, list(self.categorical))
        out = np.zeros((len(df), len(self.categorical)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            vocab = self._vocab[col]
            out[:, j] = [vocab.get(normalise_value(v), 0) for v in df[col].tolist()]
        return out

    def unknown_counts(self, df: pd.DataFrame) -> dict[str, int]:
        """Per categorical column: present values outside the vocabulary (needs no fit)."""
        counts: dict[str, int] = {}
        for col, vocab in self._vocab.items():
            if col not in df.columns:
                continue
            vals = [normalise_value(v) for v in df[col].tolist()]
            counts[col] = sum(1 for v in vals if v is not None and v not in vocab)
        return counts

    def state_dict(self, *, include_rows: bool = False) -> dict[str, Any]:
        """Plain, JSON-serialisable state. KNN imputation needs the (z-scored) training rows;
        they are included only with ``include_rows=True`` — they are patient data, keep them
        at the site. Without them a loaded KNN encoder imputes medians."""
        state: dict[str, Any] = {
            "numeric": list(self.numeric),
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "imputation": self.imputation,
            "mean": list(self.mean), "std": list(self.std), "median": list(self.median),
            "fitted": self.fitted,
        }
        if include_rows and self._knn_rows is not None:
            state["knn_rows"] = [list(r) for r in self._knn_rows]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the columns must match this encoder's."""
        if list(state.get("numeric", [])) != self.numeric or \
                {k: list(v) for k, v in state.get("categorical", {}).items()} != self.categorical:
            raise RecordError("encoder state was saved for different numeric/categorical columns")
        n = len(self.numeric)
        stats = [list(map(float, state.get(k, []))) for k in ("mean", "std", "median")]
        if any(len(s) != n for s in stats):
            raise RecordError(f"encoder state needs {n} values for mean, std and median")
        self.mean, self.std, self.median = stats
        self.fitted = bool(state.get("fitted", True))
        self._knn, self._knn_rows = None, None
        rows = state.get("knn_rows")
        if self.imputation == "knn" and rows is not None:
            self._knn_rows = [list(r) for r in rows]
            z = np.asarray([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
            self._fit_knn(z.reshape(len(rows), n))
        elif self.imputation == "knn" and n:
            warnings.warn("KNN encoder state has no training rows; imputing medians instead",
                          stacklevel=2)

    def __repr__(self) -> str:
        return (f"RecordEncoder(numeric={len(self.numeric)}, categorical={len(self.categorical)}, "
                f"imputation={self.imputation!r}, fitted={self.fitted})")
