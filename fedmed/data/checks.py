"""Whole-site checks beyond the table contract: can this site train, and do its images decode?

:func:`load_site` checks each table (columns, ids, labels, ranges, paths). The checks here
need the loaded site: a site whose samples are all one class, or with too few patients to
put one on every side of its split, trains and reports meaningless metrics with exit 0 —
so training refuses it up front (:func:`check_trainable`) and ``fedmed data check`` lists it.
:func:`image_problems` decodes every image once through the cache (later runs hit it).
Messages name the file (by its name in the site folder), lines and counts, never values,
image file names or absolute paths.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fedmed.config import DataConfig
from fedmed.data.images import ImageCache, ImageError
from fedmed.data.records import RecordError, read_table
from fedmed.data.site import SiteData, SiteDataError, load_site

__all__ = ["SiteCheck", "trainability_problems", "check_trainable", "image_problems",
           "check_site", "format_checks"]

_SHOW = 10


def min_patients(cfg: DataConfig) -> int:
    """The fewest patients that can put at least one on each of train, val and test."""
    if cfg.split_column:
        return 2
    return max(3, math.ceil(1.0 / cfg.val_fraction), math.ceil(1.0 / cfg.test_fraction))


def trainability_problems(site: SiteData, cfg: DataConfig) -> list[str]:
    """One-class sites and sites too small for their split fractions (counts only)."""
    out: list[str] = []
    counts = site.samples["label"].value_counts()
    if len(site.samples) and len(counts) < 2:
        only = cfg.classes[int(counts.index[0])]
        out.append(f"site {site.name!r}: all {int(counts.iloc[0])} sample(s) are class {only!r}: "
                   "a one-class site cannot train a classifier or report a meaningful metric")
    patients = int(site.samples["patient_id"].nunique())
    need = min_patients(cfg)
    if patients < need:
        out.append(f"site {site.name!r}: {patients} patient(s), too few for data.val_fraction "
                   f"{cfg.val_fraction:g} and data.test_fraction {cfg.test_fraction:g} (needs at "
                   f"least {need} to put a patient on every side)")
    return out


def check_trainable(site: SiteData, cfg: DataConfig) -> None:
    """Raise :class:`SiteDataError` if :func:`trainability_problems` finds any."""
    problems = trainability_problems(site, cfg)
    if problems:
        raise SiteDataError(f"site {site.name!r}: {len(problems)} problem(s):\n  - "
                            + "\n  - ".join(problems))


def _reason(exc: Exception, path: str) -> str:
    """The decoder's reason without the file's path or name (they can hold patient data)."""
    text = str(exc)
    for token in sorted({path, os.path.abspath(path), os.path.realpath(path),
                         os.path.basename(path)}, key=len, reverse=True):
        text = text.replace(token, "")
    return text.strip().lstrip(":").strip() or type(exc).__name__


def _lines(lines: list[int]) -> str:
    shown = ", ".join(str(i) for i in lines[:_SHOW])
    more = f" and {len(lines) - _SHOW} more" if len(lines) > _SHOW else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


def image_problems(site: SiteData, cache: ImageCache) -> tuple[int, list[str]]:
    """Decode every image of ``site`` once (through ``cache``); (decoded, problems).

    Failures are grouped by reason, each with the images.csv lines that have it.
    """
    rows = site.samples[site.samples["has_image"]]
    if rows.empty:
        return 0, []
    if "image_line" in rows and rows["image_line"].notna().all():
        lines = [int(x) for x in rows["image_line"]]
    else:  # images come first in samples, in images.csv order
        try:
            lines = list(read_table(site.site_dir / "images.csv").index)
        except RecordError:
            lines = []
        if len(lines) != len(rows):
            lines = list(range(2, len(rows) + 2))
    by_reason: dict[str, list[int]] = defaultdict(list)
    verdict: dict[str, str | None] = {}
    for path, line in zip(rows["image_path"], lines, strict=True):
        if path not in verdict:
            try:
                cache.load(path)
                verdict[path] = None
            except ImageError as exc:
                verdict[path] = _reason(exc, path)
        if (reason := verdict[path]) is not None:
            by_reason[reason].append(int(line))
    problems = [f"images.csv: {len(ls)} image(s) cannot be used: {reason} ({_lines(ls)})"
                for reason, ls in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
    decoded = sum(1 for v in verdict.values() if v is None)
    return decoded, problems


@dataclass
class SiteCheck:
    """One site's check: its counts (when it loaded) and every problem found."""

    name: str
    patients: int | None = None
    images: int | None = None
    decoded: int | None = None
    samples: int | None = None
    classes: int | None = None
    problems: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_site(site_dir: str | Path, cfg: DataConfig, *, name: str,
               cache: ImageCache | None) -> SiteCheck:
    """Everything training would refuse at this site, collected instead of raised."""
    out = SiteCheck(name=name)
    try:
        site = load_site(site_dir, cfg, name=name)
    except SiteDataError as exc:
        lines = str(exc).splitlines()
        out.problems = [ln.strip()[2:] if ln.strip().startswith("- ") else ln.strip()
                        for ln in (lines[1:] if len(lines) > 1 else lines)]
        return out
    s = site.samples
    out.patients, out.samples = int(s["patient_id"].nunique()), len(s)
    out.images, out.classes = int(s["has_image"].sum()), int(s["label"].nunique())
    out.summary = site.summary.table()
    out.problems += trainability_problems(site, cfg)
    if cache is not None:
        out.decoded, img = image_problems(site, cache)
        out.problems += img
    return out


def format_checks(checks: list[SiteCheck]) -> str:
    """A summary table (one row per site) followed by each site's problems."""
    head = ["site", "patients", "samples", "images", "decoded", "classes", "problems", "status"]
    rows = [[c.name, *("-" if v is None else str(v)
                       for v in (c.patients, c.samples, c.images, c.decoded, c.classes)),
             str(len(c.problems)), "ok" if c.ok else "ERROR"] for c in checks]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths, strict=True)))
    text = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    for c in checks:
        if c.problems:
            text += ["", f"{c.name}: {len(c.problems)} problem(s)"]
            text += [f"  - {p}" for p in c.problems]
    return "\n".join(text)
