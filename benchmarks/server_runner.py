"""The coordinator's warm ServerApp runner against Flower's SuperExec, on the peers' job.

``fedmed demo`` (real ``fedmed-server`` + one ``fedmed-client`` per site on loopback, launched as
:func:`benchmarks.federation.deployment` does) on :mod:`benchmarks.peers.run`'s job, alternately
with fedmed's runner (``server/warm.py``) and with Flower's SuperExec. The SuperExec arm plays
a Flower release the runner does not support (``FEDMED_SERVER_COMPAT_REQUIRE``), so
``fedmed-server`` starts ``flower-superexec`` once the run is submitted. The arms alternate
which goes first in each pair. One torch thread per process, as in the peers benchmark.

Run: ``python -m benchmarks.server_runner [--pairs 2] [--out runs/server-runner]``. Rows are
printed as JSON lines and saved to ``<out>/server_runner.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, bench_config, cohort

ARMS = {"runner": {}, "superexec": {"FEDMED_SERVER_COMPAT_REQUIRE": "fedmed.benchmarks:flower_superexec"}}


def measure(work: Path, *, pairs: int = 2) -> list[dict[str, Any]]:
    from benchmarks.federation import deployment
    from benchmarks.peers.run import JOB, _fedmed_job
    from fedmed.server.checkpoint import load_state
    from fedmed.task import load_site_bundle

    root = cohort(work / "cohort")
    cfg = bench_config(root, [f"data.image_size={JOB['image_size']}"])
    for site in [*cfg.data.sites, "central"]:  # every run starts with the decoded-image cache filled
        load_site_bundle(cfg, site_dir=root / site, progress=False)
    rows = []
    for i in range(pairs):
        for arm in (["runner", "superexec"] if i % 2 == 0 else ["superexec", "runner"]):
            out, load = work / f"{arm}-{i}", os.getloadavg()[0]
            r = deployment(ROOT / "configs" / "default.yaml", _fedmed_job(root), out,
                           env={"OMP_NUM_THREADS": "1", **ARMS[arm]})
            history = load_state(out).history
            row = {"arm": arm, "pair": i, "wall_s": r["wall_s"], "rounds_s": sum(float(h["seconds"]) for h in history),
                   "split_s": r["split_s"], "startup_marks_s": r["startup_marks_s"],
                   "central_test_auc": history[-1].get("central_test_auc"), "load_before": round(load, 2)}
            print(json.dumps(row, default=float), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "server-runner")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = measure(a.out.resolve(), pairs=a.pairs)
    (a.out / "server_runner.json").write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
