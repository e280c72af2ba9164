"""Split a pooled dataset into virtual sites for simulation: natural, IID, label and size skew.

Every partitioner takes a samples table (one row per sample, as in
:class:`fedmed.data.site.SiteData` — ``patient_id``, ``label`` and, for ``natural``, a site
column) and returns ``{site name: [patient ids]}``. Partitions are patient-level: all of a
patient's samples go to one site, every patient lands in exactly one site, and the result
is the same for the same ``seed``. :func:`write_partitions` writes the sites as ordinary
site folders (``docs/architecture.md``) so the rest of fedmed — and a real deployment —
treats them like any hospital's data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmed.data.site import SiteData
from fedmed.errors import UsageError

__all__ = [
    "PARTITIONERS",
    "Partition",
    "get_partitioner",
    "list_partitioners",
    "natural",
    "iid",
    "dirichlet",
    "quantity",
    "patient_labels",
    "partition_table",
    "write_partitions",
    "image_roots_of",
]

Partition = dict[str, list[str]]
_MIN_PATIENTS = 10  # a site needs enough patients for its own train/val/test split
_MAX_TRIES = 1000


def _site_names(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"site_{i:0{width}d}" for i in range(n)]


def patient_labels(samples: pd.DataFrame) -> pd.Series:
    """One label per patient (its most frequent sample label; ties → smallest index)."""
    counts = samples.groupby(["patient_id", "label"]).size().reset_index(name="n")
    counts = counts.sort_values(["patient_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"].sort_index()


def _check(samples: pd.DataFrame, num_sites: int) -> pd.Series:
    missing = [c for c in ("patient_id", "label") if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks column(s) {missing}")
    if num_sites < 1:
        raise UsageError(f"num_sites must be at least 1, got {num_sites}")
    labels = patient_labels(samples)
    if len(labels) < num_sites:
        raise UsageError(f"cannot split {len(labels)} patients over {num_sites} sites")
    return labels


def _min_size(n_patients: int, num_sites: int) -> int:
    return max(1, min(_MIN_PATIENTS, n_patients // (2 * num_sites)))


def natural(samples: pd.DataFrame, *, num_sites: int | None = None, alpha: float | None = None,
            seed: int = 0, column: str = "site") -> Partition:
    """The sites the data came from (``column``, e.g. HAM10000 centres, UCI hospitals).

    ``num_sites``, when given, must equal the number of sites found. A patient whose samples
    name several sites is an error (the ids would collide across hospitals).
    """
    if column not in samples.columns:
        raise UsageError(f"natural partition needs a {column!r} column in the samples table")
    per = samples.groupby("patient_id")[column].nunique()
    if (per > 1).any():
        raise UsageError(f"{int((per > 1).sum())} patient(s) appear at more than one {column!r}; "
                         "prefix patient ids by site (fedmed.data.site.combine_sites does)")
    owner = samples.drop_duplicates("patient_id").set_index("patient_id")[column].astype(str)
    names = sorted(owner.unique())
    if num_sites is not None and num_sites != len(names):
        raise UsageError(f"natural partition: the data has {len(names)} sites ({', '.join(names)}), "
                         f"not {num_sites}; drop --num-sites or pick another partitioner")
    return {s: sorted(owner.index[owner == s].astype(str)) for s in names}


def iid(samples: pd.DataFrame, *, num_sites: int, alpha: float | None = None,
        seed: int = 0) -> Partition:
    """Equal-sized sites with the pooled label mix (patients dealt round-robin per class)."""
    labels = _check(samples, num_sites)
    rng = np.random.default_rng(seed)
    names = _site_names(num_sites)
    out: dict[str, list[str]] = {s: [] for s in names}
    start = 0
    for label in sorted(labels.unique()):
        ids = labels.index[labels == label].to_numpy(dtype=str)
        rng.shuffle(ids)
        for i, pid in enumerate(ids):
            out[names[(start + i) % num_sites]].append(str(pid))
        start = (start + len(ids)) % num_sites  # keep sizes within one patient of each other
    return {s: sorted(v) for s, v in out.items()}


def _skew_setup(kind: str, samples: pd.DataFrame, num_sites: int, alpha: float | None,
                seed: int) -> tuple[pd.Series, np.random.Generator, list[str], int]:
    """What both Dirichlet-skew partitioners start from: labels, rng, site names, minimum size."""
    if alpha is None or alpha <= 0:
        raise UsageError(f"{kind} partition needs alpha > 0, got {alpha}")
    labels = _check(samples, num_sites)
    return labels, np.random.default_rng(seed), _site_names(num_sites), _min_size(len(labels), num_sites)


def dirichlet(samples: pd.DataFrame, *, num_sites: int, alpha: float = 0.5,
              seed: int = 0) -> Partition:
    """Label skew: each class's patients are shared out by proportions ~ Dir(α·1).

    Small α (0.1) gives sites dominated by a few classes; large α (100) approaches IID.
    Draws are repeated (seeded) until every site has a minimum number of patients
    (``min(10, patients / (2·sites))``); raises ValueError if that never happens.
    """
    labels, rng, names, need = _skew_setup("dirichlet", samples, num_sites, alpha, seed)
    by_class = {c: labels.index[labels == c].to_numpy(dtype=str) for c in sorted(labels.unique())}
    for _ in range(_MAX_TRIES):
        parts: list[list[str]] = [[] for _ in names]
        for ids in by_class.values():
            ids = ids.copy()
            rng.shuffle(ids)
            props = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(props)[:-1] * len(ids)).astype(int)
            for k, chunk in enumerate(np.split(ids, cuts)):
                parts[k].extend(str(p) for p in chunk)
        if min(len(p) for p in parts) >= need:
            return {s: sorted(p) for s, p in zip(names, parts, strict=True)}
    raise UsageError(f"dirichlet(alpha={alpha}) could not give every one of {num_sites} sites "
                     f"{need} patients in {_MAX_TRIES} draws; raise alpha or lower --num-sites")


def quantity(samples: pd.DataFrame, *, num_sites: int, alpha: float = 1.0,
             seed: int = 0) -> Partition:
    """Size skew: site sizes ~ Dir(α·1) of all patients, label mix left to chance.

    Small α gives a few large hospitals and many small ones. Every site gets at least
    ``min(10, patients / (2·sites))`` patients.
    """
    labels, rng, names, need = _skew_setup("quantity", samples, num_sites, alpha, seed)
    ids = labels.index.to_numpy(dtype=str)
    rng.shuffle(ids)
    spare = len(ids) - need * num_sites
    props = rng.dirichlet(np.full(num_sites, alpha))
    sizes = need + np.floor(props * spare).astype(int)
    sizes[np.argmax(props)] += len(ids) - int(sizes.sum())  # rounding leftovers
    chunks = np.split(ids, np.cumsum(sizes)[:-1])
    return {s: sorted(str(p) for p in c) for s, c in zip(names, chunks, strict=True)}


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "natural": natural,
    "iid": iid,
    "dirichlet": dirichlet,
    "quantity": quantity,
}


def list_partitioners() -> list[str]:
    return sorted(PARTITIONERS)


def get_partitioner(name: str) -> Callable[..., Partition]:
    """The partitioner registered as ``name``; the error lists the valid names."""
    key = name.lower()
    if key not in PARTITIONERS:
        raise UsageError(f"unknown partitioner {name!r}; valid: {', '.join(list_partitioners())}")
    return PARTITIONERS[key]


def partition_table(samples: pd.DataFrame, parts: Partition, *, classes: list[str]) -> str:
    """Per-site patients, samples and label mix (samples per class and its share), as text."""
    owner = {pid: site for site, ids in parts.items() for pid in ids}
    site_of = samples["patient_id"].astype(str).map(owner)
    header = ["site", "patients", "samples", *classes]
    rows: list[list[str]] = []
    total = np.zeros(len(classes), dtype=int)
    for site in parts:
        sub = samples[site_of == site]
        counts = np.bincount(sub["label"].to_numpy(dtype=int), minlength=len(classes))[:len(classes)]
        total += counts
        n = max(int(counts.sum()), 1)
        rows.append([site, str(len(parts[site])), str(len(sub)),
                     *(f"{c} ({100 * c / n:.0f}%)" for c in counts)])
    n = max(int(total.sum()), 1)
    rows.append(["all", str(sum(len(v) for v in parts.values())), str(int((site_of.notna()).sum())),
                 *(f"{c} ({100 * c / n:.0f}%)" for c in total)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows[:-1]),
             fmt(["-" * w for w in widths]), fmt(rows[-1])]
    return "\n".join(lines)


def image_roots_of(pooled: SiteData) -> list[str]:
    """The folders of a pooled set's image files: what partitions of it may point into."""
    paths = pooled.samples.loc[pooled.samples["has_image"], "image_path"]
    return sorted({str(Path(p).resolve().parent) for p in paths})


def write_partitions(
    pooled: SiteData,
    parts: Partition,
    out_dir: str | Path,
    *,
    classes: list[str],
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write each partition as a site folder under ``out_dir``; returns ``{site: folder}``.

    ``records.csv`` holds the partition's patients (id, label, the record features);
    ``images.csv`` (when there are images) references the original files by absolute path —
    nothing is copied; the config that loads the partitions must list their folders in
    ``data.image_roots`` (:func:`image_roots_of`). ``partition.json`` records ``meta`` and the per-site counts.
    Patients in ``parts`` that ``pooled`` does not hold are an error.
    """
    out_dir = Path(out_dir)
    samples = pooled.samples
    known = set(samples["patient_id"].astype(str))
    unknown = [p for ids in parts.values() for p in ids if p not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} patient id(s) in the partition are not in the pooled data")
    labels = patient_labels(samples).map(lambda i: classes[int(i)])
    written: dict[str, Path] = {}
    for site, ids in parts.items():
        folder = out_dir / site
        folder.mkdir(parents=True, exist_ok=True)
        sub = samples[samples["patient_id"].astype(str).isin(set(ids))]
        rec_ids = [p for p in dict.fromkeys(sub.loc[sub["has_record"], "patient_id"].astype(str))]
        if rec_ids:
            rec = pooled.records.loc[rec_ids].copy()
            rec.insert(0, "label", labels.loc[rec_ids].to_numpy())
            rec.insert(0, "patient_id", rec_ids)
            rec.to_csv(folder / "records.csv", index=False)
        img = sub[sub["has_image"]]
        if len(img):
            pd.DataFrame({"image": [str(Path(p).absolute()) for p in img["image_path"]],
                          "patient_id": img["patient_id"].astype(str).to_numpy(),
                          "label": [classes[int(i)] for i in img["label"]]}).to_csv(
                folder / "images.csv", index=False)
        written[site] = folder
    counts = {s: len(ids) for s, ids in parts.items()}
    (out_dir / "partition.json").write_text(json.dumps({**(meta or {}), "patients": counts}, indent=2))
    return written
