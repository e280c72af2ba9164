"""Federated statistics: what each site may tell a study team about its data, and the pool.

A site answers a ``query.statistics`` message with aggregates only — counts, label mix,
missingness per column, histograms on bins both ends derive from the config (so they add
up across sites), categorical counts in the config's vocabulary, image properties and an
intensity histogram — as one flat dict of numbers (:func:`site_statistics`). Nothing
row-level leaves: no minimum, maximum, id, value or file name.

Small cells: any count ``0 < c < k`` is sent as :data:`SUPPRESSED` (-1), and when a group of
counts that sums to a released total (a histogram, a category's values, the label mix)
has exactly one suppressed cell, the next-smallest is suppressed too, so the total cannot
give it back. ``k`` is the larger of the site's floor (``SitePolicy.stats_min_count``) and the
server's request: the server may ask for more, never for less. A mean/std is sent only over
at least ``k`` values. A site with fewer than ``k`` patients refuses.

Optional noise: with ``epsilon`` set, every released count gets Gaussian noise (the Gaussian
mechanism, σ = Δ·√(2 ln(1.25/δ'))/ε' with ε' = ε/G, δ' = δ/G over the G released groups,
basic composition; neighbouring data sets differ by one patient, Δ = 1 for patient-level
groups and the site's largest number of samples per patient for sample-level ones), and
means/std come from the noisy histograms at the server. Anchors: NVIDIA FLARE's federated
statistics (min_count, shared histogram bins, noise), Fed-BioMed's federated analytics.

Hand-rolled because neither FLARE nor Fed-BioMed is a dependency and both run inside their
own frameworks; the arithmetic here is counts, sums and one Gaussian draw per cell.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmed.config import DataConfig
from fedmed.data.records import normalise_value
from fedmed.data.site import SiteData
from fedmed.errors import UsageError

__all__ = ["SUPPRESSED", "StatsRequest", "site_statistics", "numeric_edges", "IMAGE_EDGES",
           "INTENSITY_BINS", "pool_statistics", "hist_quantiles"]

SUPPRESSED = -1.0
DEFAULT_K = 5
IMAGE_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096]  # image height/width bins (pixels)
INTENSITY_BINS = 16
_KEY = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class StatsRequest:
    """What the server asks: its k (raised to the site's floor), bins, optional noise."""

    k: int = DEFAULT_K
    bins: int = 10
    epsilon: float | None = None
    delta: float = 1e-5
    images: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bins <= 100:
            raise UsageError("statistics bins must be in [1, 100]")
        if self.epsilon is not None and not (0 < self.epsilon <= 100):
            raise UsageError("statistics epsilon must be in (0, 100]")
        if not 0 < self.delta < 1:
            raise UsageError("statistics delta must be in (0, 1)")


def numeric_edges(cfg: DataConfig, col: str, bins: int) -> list[float] | None:
    """Shared histogram edges of a numeric column: ``data.ranges[col]`` cut in ``bins``."""
    if col not in cfg.ranges:
        return None
    lo, hi = cfg.ranges[col]
    return np.linspace(float(lo), float(hi), bins + 1).tolist()


def _hist(values: np.ndarray, edges: Sequence[float]) -> list[float]:
    """Counts in [under, bin 1..n, over] (the last bin includes its right edge)."""
    v = values[~np.isnan(values)]
    inner, _ = np.histogram(v[(v >= edges[0]) & (v <= edges[-1])], bins=edges)
    return [float((v < edges[0]).sum()), *map(float, inner), float((v > edges[-1]).sum())]


def _safe_key(text: Any) -> str:
    return _KEY.sub("_", str(text))[:32] or "_"


class _Release:
    """Collects groups of counts, suppresses small cells, adds noise, flattens to metrics."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.groups: list[tuple[Mapping[str, float | list[float]], float]] = []  # cells, sensitivity
        self.plain: dict[str, float] = {}

    def group(self, cells: Mapping[str, float | list[float]], *, sensitivity: float = 1.0) -> None:
        self.groups.append((cells, sensitivity))

    def _suppress(self, cells: Mapping[str, float | list[float]]) -> dict[str, float | list[float]]:
        flat = [(key, i, float(v)) for key, val in cells.items()
                for i, v in enumerate(val if isinstance(val, list) else [val])]
        small = {(key, i) for key, i, v in flat if 0 < v < self.k}
        if len(small) == 1:  # secondary suppression: one hidden cell = total minus the rest
            rest = sorted((v, key, i) for key, i, v in flat if (key, i) not in small and v > 0)
            if rest:
                small.add((rest[0][1], rest[0][2]))
        out: dict[str, float | list[float]] = {}
        for key, val in cells.items():
            if isinstance(val, list):
                out[key] = [SUPPRESSED if (key, i) in small else float(v) for i, v in enumerate(val)]
            else:
                out[key] = SUPPRESSED if (key, 0) in small else float(val)
        return out

    def metrics(self, *, epsilon: float | None, delta: float,
                rng: np.random.Generator) -> dict[str, float | list[float]]:
        out: dict[str, float | list[float]] = {}
        n_groups = max(1, len(self.groups))
        for cells, sens in self.groups:
            cells = self._suppress(cells)
            if epsilon is not None:
                eps, dlt = epsilon / n_groups, delta / n_groups
                sigma = sens * math.sqrt(2.0 * math.log(1.25 / dlt)) / eps
                cells = {key: ([v if v == SUPPRESSED else max(0.0, v + float(rng.normal(0, sigma)))
                                for v in val] if isinstance(val, list)
                               else val if val == SUPPRESSED else max(0.0, val + float(rng.normal(0, sigma))))
                         for key, val in cells.items()}
            out.update(cells)
        out.update(self.plain)
        return out


def _numeric(rel: _Release, records: pd.DataFrame, cfg: DataConfig, req: StatsRequest) -> None:
    for col in cfg.numeric:
        x = pd.to_numeric(records[col], errors="coerce").to_numpy(dtype=float)
        present = x[~np.isnan(x)]
        edges = numeric_edges(cfg, col, req.bins)
        cells: dict[str, float | list[float]] = {f"num.{col}.missing": float(np.isnan(x).sum())}
        if edges is not None:
            cells[f"num.{col}.hist"] = _hist(x, edges)
        else:
            cells[f"num.{col}.present"] = float(len(present))
        rel.group(cells)
        if req.epsilon is None and len(present) >= rel.k:
            rel.plain[f"num.{col}.mean"] = float(present.mean())
            rel.plain[f"num.{col}.std"] = float(present.std(ddof=1)) if len(present) > 1 else 0.0


def _categorical(rel: _Release, records: pd.DataFrame, cfg: DataConfig) -> None:
    for col, vocab in cfg.categorical.items():
        vals = [normalise_value(v) for v in records[col].tolist()]
        index = {normalise_value(v): j for j, v in enumerate(vocab)}
        counts = [0.0] * len(vocab)
        unknown = missing = 0.0
        for v in vals:
            if v is None:
                missing += 1
            elif v in index:
                counts[index[v]] += 1
            else:
                unknown += 1
        rel.group({f"cat.{col}": counts, f"cat.{col}.unknown": unknown, f"cat.{col}.missing": missing})


def _image_properties(rel: _Release, paths: list[str], cache: Any, m: float, k: int) -> None:
    """Sizes, channels, formats, DICOM header codes and an intensity histogram."""
    from PIL import Image

    heights, widths, channels, fmt = [], [], {"1": 0.0, "3": 0.0, "other": 0.0}, {"dicom": 0.0, "raster": 0.0}
    dicom: dict[str, dict[str, float]] = {"modality": {}, "photometric": {}, "manufacturer": {}}
    unreadable = 0.0
    intensity = np.zeros(INTENSITY_BINS)
    for p in paths:
        try:
            if Path(p).suffix.lower() in ("", ".dcm", ".dicom"):
                import pydicom

                ds = pydicom.dcmread(p, stop_before_pixels=True)
                h, w, c = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), int(ds.get("SamplesPerPixel") or 1)
                fmt["dicom"] += 1
                for key, tag in (("modality", "Modality"), ("photometric", "PhotometricInterpretation"),
                                 ("manufacturer", "Manufacturer")):
                    name = _safe_key(ds.get(tag) or "none")
                    dicom[key][name] = dicom[key].get(name, 0.0) + 1
            else:
                with Image.open(p) as im:
                    (w, h), c = im.size, len(im.getbands())
                fmt["raster"] += 1
        except Exception:  # noqa: BLE001 - an unreadable file is a count here, never a reason
            unreadable += 1
            continue
        heights.append(h)
        widths.append(w)
        channels[str(c) if str(c) in ("1", "3") else "other"] += 1
        if cache is not None:
            try:
                arr = np.asarray(cache.load(p), dtype=float)
                hist, _ = np.histogram(arr, bins=INTENSITY_BINS, range=(0, 256))
                intensity += hist / max(1, hist.sum())  # each image adds a histogram summing to 1
            except Exception:  # noqa: BLE001
                unreadable += 0  # already counted by the header read if it fails there
    rel.group({"img.height.hist": _hist(np.asarray(heights, float), IMAGE_EDGES),
               "img.width.hist": _hist(np.asarray(widths, float), IMAGE_EDGES),
               "img.unreadable": unreadable}, sensitivity=m)
    rel.group({f"img.channels.{k_}": v for k_, v in channels.items()}, sensitivity=m)
    rel.group({f"img.format.{k_}": v for k_, v in fmt.items()}, sensitivity=m)
    for key, counts in dicom.items():
        if counts:
            # Free-text header values (manufacturer) leave only as a category of >= k images.
            big = {n: v for n, v in counts.items() if v >= k}
            other = sum(v for n, v in counts.items() if v < k)
            cells = {f"dicom.{key}.{n}": v for n, v in big.items()}
            cells[f"dicom.{key}.other"] = float(other)
            rel.group(cells, sensitivity=m)
    if cache is not None and len(heights) >= k:
        rel.group({"img.intensity.hist": [float(v) for v in intensity]}, sensitivity=m)


def site_statistics(site: SiteData, cfg: DataConfig, *, request: StatsRequest, site_k: int,
                    cache: Any = None, seed: int = 0) -> dict[str, float | list[float]]:
    """The aggregates this site releases, as flat metric names → numbers (see the module doc).

    ``site_k`` is the site's own floor; the k used is ``max(site_k, request.k)`` and is sent
    back as ``stats.k``. Raises ``ValueError`` when the site has fewer than k patients.
    """
    k = max(int(site_k), int(request.k), 1)
    s = site.samples
    patients = int(s["patient_id"].nunique())
    if patients < k:
        raise UsageError(f"fewer than k={k} patients at this site: statistics refused")
    rel = _Release(k)
    per_patient = s.groupby("patient_id").size()
    m = float(per_patient.max()) if len(per_patient) else 1.0
    rel.group({"n.patients": float(patients), "n.records": float(len(site.records))})
    rel.group({"n.samples": float(len(s)), "n.images": float(s["has_image"].sum())}, sensitivity=m)
    labels = np.bincount(s["label"].to_numpy(), minlength=len(cfg.classes)).astype(float)
    rel.group({"label": labels.tolist()}, sensitivity=m)
    if len(site.records):
        _numeric(rel, site.records, cfg, request)
        _categorical(rel, site.records, cfg)
    paths = list(dict.fromkeys(s.loc[s["has_image"], "image_path"].tolist()))
    if request.images and paths:
        _image_properties(rel, paths, cache, m, k)
    out = rel.metrics(epsilon=request.epsilon, delta=request.delta,
                      rng=np.random.default_rng(seed))
    out["stats.k"] = float(k)
    if request.epsilon is not None:
        out["privacy.epsilon"], out["privacy.delta"] = float(request.epsilon), float(request.delta)
    return out


def hist_quantiles(counts: list[float], edges: list[float], qs: tuple[float, ...] = (0.25, 0.5, 0.75)
                   ) -> dict[str, float | None]:
    """Quantiles by linear interpolation in a histogram [under, bins..., over] (suppressed = 0)."""
    inner = np.clip(np.asarray(counts[1:-1], float), 0, None)
    total = inner.sum()
    if total <= 0:
        return {f"q{int(q * 100)}": None for q in qs}
    cum = np.concatenate([[0.0], np.cumsum(inner)]) / total
    return {f"q{int(q * 100)}": float(np.interp(q, cum, edges)) for q in qs}


def _add(a: Any, b: Any) -> Any:
    """Sum two released values, a suppressed cell counting as 0 (it is flagged separately)."""
    if isinstance(a, list):
        return [_add(x, y) for x, y in zip(a, b, strict=False)]
    return max(a, 0.0) + max(b, 0.0)


def pool_statistics(per_site: dict[str, dict[str, Any]], cfg: DataConfig, *, bins: int) -> dict[str, Any]:
    """The pooled view: counts summed (suppressed cells as 0, and how many), means weighted,
    quantiles from the merged histograms, mean/std from histograms where no exact ones came."""
    pooled: dict[str, Any] = {}
    suppressed: dict[str, int] = {}
    for stats in per_site.values():
        for key, val in stats.items():
            if key.endswith((".mean", ".std")) or key.startswith(("stats.", "privacy.")):
                continue
            n_sup = sum(1 for v in (val if isinstance(val, list) else [val]) if v == SUPPRESSED)
            if n_sup:
                suppressed[key] = suppressed.get(key, 0) + n_sup
            pooled[key] = _add(pooled[key], val) if key in pooled else _add(val, [0.0] * len(val)
                                                                               if isinstance(val, list) else 0.0)
    summary: dict[str, Any] = {}
    for col in cfg.numeric:
        edges = numeric_edges(cfg, col, bins)
        hist = pooled.get(f"num.{col}.hist")
        entry: dict[str, Any] = {}
        if edges is not None and hist is not None:
            entry.update(hist_quantiles(hist, edges))
            mids = (np.asarray(edges[:-1]) + np.asarray(edges[1:])) / 2
            inner = np.clip(np.asarray(hist[1:-1], float), 0, None)
            if inner.sum() > 0:
                mu = float((mids * inner).sum() / inner.sum())
                entry["hist_mean"] = mu
                entry["hist_std"] = float(math.sqrt(((mids - mu) ** 2 * inner).sum() / inner.sum()))
        given = [(s.get(f"num.{col}.mean"), s.get(f"num.{col}.std"), s.get("n.records", 0))
                 for s in per_site.values()]
        exact = [(m, sd, max(float(n), 0.0)) for m, sd, n in given if m is not None and sd is not None]
        if exact and len(exact) == len(per_site):
            w = np.asarray([n for _, _, n in exact])
            mus = np.asarray([m for m, _, _ in exact])
            var = np.asarray([sd ** 2 for _, sd, _ in exact])
            mu = float((w * mus).sum() / w.sum())
            entry["mean"] = mu
            entry["std"] = float(math.sqrt((w * (var + (mus - mu) ** 2)).sum() / w.sum()))
        summary[col] = entry
    return {"counts": pooled, "suppressed_cells": suppressed, "numeric": summary}
