"""Scale: 5 / 10 / 25 / 50 simulated sites — wall time per round and peak memory.

Each site is a small synthetic hospital (the same size at every scale), so the work per
round grows linearly with the number of sites; memory must grow at most linearly too
(Flower's simulation engine runs a fixed pool of ClientApp actors, not one per site).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import bench_config, cohort

__all__ = ["measure"]


def measure(work: Path, *, sizes: tuple[int, ...] = (5, 10, 25, 50), rounds: int = 3,
            patients: int = 24, image_size: int = 32) -> dict[str, Any]:
    import json

    from fedmed.experiments.simulate import simulate

    rows = []
    for n in sizes:
        root = cohort(work / f"sites{n}", sites=n, central=0, image_size=image_size, patients=[patients] * n)
        cfg = bench_config(root, [f"federation.rounds={rounds}", "federation.local_epochs=1",
                                  f"federation.evaluate_every={rounds}", f"data.image_size={image_size}",
                                  "train.batch_size=16", "data.augment=false"])
        out = work / f"sim{n}"
        simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=1)
        t = json.loads((out / "timing.json").read_text())
        rows.append({"sites": n, "total_s": t["total_s"], "startup_s": t["startup_s"],
                     "steady_round_s": t["steady_round_s"], "round_s": t["round_s"],
                     "peak_rss_mb": t["peak_rss_mb"]})
    # Linear fit of memory on sites: the intercept is the engine, the slope the cost of a site.
    x = np.array([r["sites"] for r in rows], dtype=float)
    y = np.array([r["peak_rss_mb"] for r in rows], dtype=float)
    slope, intercept = (np.polyfit(x, y, 1) if len(rows) > 1 else (0.0, float(y[0])))
    # "At most linear": memory per site at the largest scale is no more than at the smallest.
    per_site = [(r["peak_rss_mb"] - intercept) / r["sites"] for r in rows]
    growth = (rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]) / (rows[-1]["sites"] / rows[0]["sites"])
    return {"rows": rows, "mem_slope_mb_per_site": float(slope), "mem_intercept_mb": float(intercept),
            "mem_per_site_mb": per_site, "mem_growth_over_site_growth": float(growth),
            "patients_per_site": patients, "image_size": image_size, "rounds": rounds}
