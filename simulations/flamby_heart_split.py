"""Write FLamby's Fed-Heart-Disease train/test split into a fedmed heart-disease import.

FLamby (owkin/FLamby, ``flamby/datasets/fed_heart_disease/dataset.py``) fixes its split per
hospital with this rule, reproduced here so fedmed can be compared on the same patients:

1. read ``processed.<centre>.data`` (no header), ``?`` is missing;
2. drop columns 10-12 (slope, ca, thal: mostly missing outside Cleveland), then every row
   that still has a missing value;
3. per centre, ``sklearn.model_selection.train_test_split`` of the remaining row positions
   with ``train_size=0.66``, ``test_size=0.34``, ``random_state=43``, ``shuffle=True``,
   stratified on the binary label (``num > 0``) when both classes have more than 2 rows.

That gives train/test = 199/104 (Cleveland), 172/89 (Hungary), 30/16 (Switzerland),
85/45 (Long Beach VA). The import written here keeps exactly FLamby's rows (the ones it
drops are in neither of its sets), adds a ``split`` column (train/test; fedmed carves val
from the train side for early stopping) and a ``fedmed-data.yaml`` with
``split_column: split`` and FLamby's features (slope, ca and thal ignored).

Usage: python simulations/flamby_heart_split.py ../shared/data/uci-heart-disease data/heart-disease-flamby
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fedmed.data.importers import import_heart_disease, write_dataset_config
from fedmed.data.importers.heart_disease import (
    HEART_CATEGORICAL,
    HEART_CLASSES,
    HEART_NUMERIC,
    HEART_SITES,
)

__all__ = ["FLAMBY_SIZES", "flamby_sides", "write_flamby_split"]

FLAMBY_SIZES = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16),
                "va": (85, 45)}
_DROPPED = ["slope", "ca", "thal"]  # FLamby's columns 10, 11, 12


def flamby_sides(path: Path) -> dict[int, str]:
    """File line (1-based) → ``"train"``/``"test"`` for the rows FLamby keeps from one centre."""
    df = pd.read_csv(path, header=None)
    df = df.replace("?", np.nan).drop([10, 11, 12], axis=1).dropna(axis=0)
    lines = (df.index.to_numpy() + 1).tolist()  # the files have no header and no blank lines
    y = (df.iloc[:, -1].astype(float) > 0).astype(int)
    stratify = y if y.nunique() > 1 and all((y == v).sum() > 2 for v in y.unique()) else None
    train, test = train_test_split(np.arange(len(df)), test_size=1.0 - 0.66, train_size=0.66,
                                   random_state=43, shuffle=True, stratify=stratify)
    sides = {lines[i]: "train" for i in train}
    sides.update({lines[i]: "test" for i in test})
    return sides


def write_flamby_split(src: str | Path, out: str | Path) -> dict[str, tuple[int, int]]:
    """Import ``src`` into ``out`` keeping FLamby's rows, with its side in column ``split``.

    Returns per-site (train, test) counts; raises ``AssertionError`` if they are not FLamby's.
    """
    src, out = Path(src), Path(out)
    import_heart_disease(src, out)
    sizes: dict[str, tuple[int, int]] = {}
    for site in HEART_SITES:
        sides = flamby_sides(src / f"processed.{site}.data")
        path = out / site / "records.csv"
        rec = pd.read_csv(path, dtype=str, keep_default_na=False)
        line = rec["patient_id"].str.rsplit("-", n=1).str[1].astype(int)  # ids are <site>-<line>
        rec["split"] = line.map(sides)
        rec = rec[rec["split"].notna()]
        rec.to_csv(path, index=False)
        sizes[site] = (int((rec["split"] == "train").sum()), int((rec["split"] == "test").sum()))
    assert sizes == FLAMBY_SIZES, f"FLamby's split sizes not reproduced: {sizes}"
    write_dataset_config(
        out, classes=HEART_CLASSES, numeric=[c for c in HEART_NUMERIC if c not in _DROPPED],
        categorical={k: v for k, v in HEART_CATEGORICAL.items() if k not in _DROPPED},
        ignore_columns=_DROPPED, channels=1, image_size=64,
        comment="UCI Heart Disease with FLamby's Fed-Heart-Disease split (column `split`; "
        "written by simulations/flamby_heart_split.py).")
    cfg = out / "fedmed-data.yaml"
    text = cfg.read_text().replace("  channels: 1\n", "  split_column: split\n  channels: 1\n")
    cfg.write_text(text)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder with the four processed.<centre>.data files")
    parser.add_argument("out", help="import folder to write (one sub-folder per hospital)")
    args = parser.parse_args(argv)
    for site, (train, test) in write_flamby_split(args.src, args.out).items():
        print(f"{site:12s} train {train:4d}  test {test:4d}")
    print(f"wrote {args.out} (split_column: split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
