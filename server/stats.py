"""The coordinator's side of federated statistics: ask every site, pool, write JSON + HTML.

One ``query.statistics`` message per connected site (the job says which columns and classes;
the request says k, bins and optional noise), the replies screened like any metric reply
(an error reply is kept as its public reason), then :func:`fedmed.stats.pool_statistics`.
Writes ``stats.json`` (per site, pooled, failures, the request) and ``stats.html`` (one row
of plots per variable: each site side by side, then the pool).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from matplotlib.figure import Figure

from fedmed.config import FedmedConfig
from fedmed.job import job_for_sites
from fedmed.messages import (
    CONFIG_KEY,
    JOB_KEY,
    STATS_ACTION,
    encode_job,
    failure_text,
    reply_site,
)
from fedmed.reporting.html import esc, figure_uri, image, table, write_page
from fedmed.server.federation import _wait_for_sites, send_and_receive
from fedmed.stats import (
    IMAGE_EDGES,
    INTENSITY_BINS,
    SUPPRESSED,
    StatsRequest,
    numeric_edges,
    pool_statistics,
)

__all__ = ["STATS_REQUEST", "run_stats", "write_stats_report"]

STATS_REQUEST = "stats-request.json"
log = logging.getLogger("fedmed.server")


def _request_record(cfg: FedmedConfig, req: StatsRequest) -> ConfigRecord:
    return ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), "stats-k": int(req.k),
                         "stats-bins": int(req.bins), "stats-epsilon": float(req.epsilon or 0.0),
                         "stats-delta": float(req.delta), "stats-images": bool(req.images)})


def collect(grid: Any, cfg: FedmedConfig, req: StatsRequest) -> dict[str, Any]:
    """Ask every connected site once; per-site aggregates, failures and the pooled view."""
    _wait_for_sites(grid, cfg.federation.min_sites, cfg.federation.round_timeout)
    record = _request_record(cfg, req)
    msgs = [Message(content=RecordDict({CONFIG_KEY: record}),
                    message_type=f"{MessageType.QUERY}.{STATS_ACTION}", dst_node_id=n)
            for n in sorted(grid.get_node_ids())]
    replies = send_and_receive(grid, msgs, timeout=cfg.federation.round_timeout)
    per_site: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for r in replies:
        site = reply_site(r)
        if r.has_error():
            failed[site] = failure_text(r)
        else:
            per_site[site] = {k: (list(v) if isinstance(v, list) else v)
                              for k, v in dict(r.content["metrics"]).items()}
    per_site = dict(sorted(per_site.items()))
    return {"request": {"k": req.k, "bins": req.bins, "epsilon": req.epsilon, "delta": req.delta},
            "classes": list(cfg.data.classes), "sites": per_site, "failed": failed,
            "pooled": pool_statistics(per_site, cfg.data, bins=req.bins)}


def run_stats(grid: Any, run_config: dict) -> Path:
    """ServerApp entry for ``fedmed-task = stats``: settings from the run folder's files."""
    cfg = FedmedConfig.model_validate_json(Path(str(run_config["fedmed-config"])).read_text())
    out = Path(str(run_config["out-dir"]))
    req = StatsRequest(**json.loads((out / STATS_REQUEST).read_text()))
    result = collect(grid, cfg, req)
    (out / "stats.json").write_text(json.dumps(result, indent=2, default=float))
    write_stats_report(result, cfg, out / "stats.html")
    log.info("statistics from %d site(s) (%d failed): %s", len(result["sites"]), len(result["failed"]),
             out / "stats.html")
    return out


def _bars(title: str, labels: list[str], series: dict[str, list[float]]) -> str:
    """One subplot per site plus the pool; suppressed cells hatched at height 0."""
    n = len(series)
    fig = Figure(figsize=(2.6 * n, 2.4))
    for i, (name, vals) in enumerate(series.items()):
        ax = fig.add_subplot(1, n, i + 1)
        vals = [float(v) for v in vals]
        shown = [max(v, 0.0) for v in vals]
        bars = ax.bar(range(len(vals)), shown, color="#4c72b0" if name != "pooled" else "#dd8452")
        for b, v in zip(bars, vals, strict=True):
            if v == SUPPRESSED:
                ax.text(b.get_x() + b.get_width() / 2, 0, "<k", ha="center", va="bottom", fontsize=6)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle(title, fontsize=9, y=1.06)
    return f"<h3>{esc(title)}</h3>" + image(figure_uri(fig), title)


def _edge_labels(edges: Sequence[float]) -> list[str]:
    return ["<" + f"{edges[0]:g}", *(f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)),
            ">" + f"{edges[-1]:g}"]


def write_stats_report(result: dict[str, Any], cfg: FedmedConfig, path: Path) -> Path:
    """``stats.html``: a counts table, then per variable the sites side by side and the pool."""
    sites, pooled = result["sites"], result["pooled"]["counts"]
    every = {**sites, "pooled": pooled}
    parts = [f"<p>k = {result['request']['k']} requested (each site applies max(k, its floor); "
             f"cells below it show as &lt;k); noise ε = {result['request']['epsilon'] or 'none'}. "
             f"Failed sites: {esc(json.dumps(result['failed'])) or 'none'}.</p>"]
    rows = ["n.patients", "n.records", "n.samples", "n.images", "stats.k"]
    parts.append(table(["", *every], [[r, *("<k" if v.get(r) == SUPPRESSED else round(v.get(r, 0), 1)
                                            for v in every.values())] for r in rows]))
    parts.append(_bars("label mix (samples)", list(cfg.data.classes),
                       {s: v.get("label", [0] * len(cfg.data.classes)) for s, v in every.items()}))
    bins = int(result["request"]["bins"])
    for col in cfg.data.numeric:
        edges = numeric_edges(cfg.data, col, bins)
        key = f"num.{col}.hist"
        if edges is not None and any(key in v for v in every.values()):
            q = result["pooled"]["numeric"].get(col, {})
            extra = ", ".join(f"{k} {v:.3g}" for k, v in q.items() if isinstance(v, float))
            parts.append(_bars(f"{col} (pooled: {extra})", _edge_labels(edges),
                               {s: v.get(key, [0] * (bins + 2)) for s, v in every.items()}))
    missing = [f"num.{c}.missing" for c in cfg.data.numeric] + [f"cat.{c}.missing" for c in cfg.data.categorical]
    parts.append(_bars("missing values per column", [m.split(".")[1] for m in missing],
                       {s: [v.get(m, 0) for m in missing] for s, v in every.items()}))
    for col, vocab in cfg.data.categorical.items():
        parts.append(_bars(f"{col}", [*map(str, vocab), "unknown", "missing"],
                           {s: [*v.get(f"cat.{col}", [0] * len(vocab)), v.get(f"cat.{col}.unknown", 0),
                                v.get(f"cat.{col}.missing", 0)] for s, v in every.items()}))
    if any("img.height.hist" in v for v in every.values()):
        for dim in ("height", "width"):
            parts.append(_bars(f"image {dim} (pixels)", _edge_labels(IMAGE_EDGES),
                               {s: v.get(f"img.{dim}.hist", [0] * (len(IMAGE_EDGES) + 1)) for s, v in every.items()}))
        for prefix in ("img.channels.", "img.format.", "dicom.modality.", "dicom.photometric.",
                       "dicom.manufacturer."):
            names = sorted({k[len(prefix):] for v in every.values() for k in v if k.startswith(prefix)})
            if names:
                parts.append(_bars(prefix.rstrip("."), names,
                                   {s: [v.get(prefix + n, 0) for n in names] for s, v in every.items()}))
        if any("img.intensity.hist" in v for v in every.values()):
            labels = [f"{int(a)}" for a in np.linspace(0, 256, INTENSITY_BINS + 1)[:-1]]
            parts.append(_bars("intensity (preprocessed, images per bin-share)", labels,
                               {s: v.get("img.intensity.hist", [0] * INTENSITY_BINS) for s, v in every.items()}))
    write_page(path, "fedmed statistics", parts, heading=f"fedmed statistics: {cfg.name}")
    return path
