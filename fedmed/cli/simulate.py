"""``fedmed simulate``: N virtual sites on this machine, with the deployment's own apps."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedmed.errors import UsageError

__all__ = ["register"]


def _cmd(args: argparse.Namespace) -> int:
    from fedmed.config import load_config
    from fedmed.experiments.simulate import prepare_sites, simulate

    cfg = load_config(args.config, args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(cfg.output_dir) / f"{cfg.name}-sim-{stamp}"
    if args.resume and not (out / "state.pkl").exists():
        raise UsageError(f"--resume: {out} holds no stopped federation (no state.pkl); check --out")
    if (out / "state.pkl").exists() and not args.resume:
        raise UsageError(f"{out} already holds a federation; pass --resume to continue it or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg, table = prepare_sites(cfg, sites=args.sites, partition=args.partition, num_sites=args.num_sites,
                               alpha=args.alpha, seed=args.partition_seed, out_dir=out)
    print(f"fedmed simulate: {len(cfg.data.sites or [])} virtual sites "
          f"({args.partition or 'natural'} partition)\n{table}\n", flush=True)
    simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=args.cpus_per_site,
             num_gpus_per_site=args.gpus_per_site, total_cpus=args.cpus, mlflow_uri=args.mlflow_uri,
             resume=args.resume)
    timing = json.loads((out / "timing.json").read_text())
    print(f"fedmed simulate: done in {timing['total_s']:.1f}s (start-up ~{timing['startup_s']:.1f}s, "
          f"then {timing['steady_round_s']:.1f}s/round, peak memory "
          f"{timing['peak_rss_mb']:.0f} MiB); report {out / 'report.html'}", flush=True)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="simulate a federation of N virtual sites on this machine")
    p.add_argument("--config", "-c", default="configs/default.yaml", help="YAML config file")
    p.add_argument("--sites", nargs="+", help="site folders to use (default data.sites, else all)")
    p.add_argument("--partition", choices=["natural", "iid", "dirichlet", "quantity"],
                   help="re-split the pooled sites into --num-sites virtual sites (default natural)")
    p.add_argument("--num-sites", type=int, help="number of virtual sites (iid/dirichlet/quantity)")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (dirichlet: labels, quantity: sizes)")
    p.add_argument("--partition-seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default <output_dir>/<name>-sim-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped federation in --out (same config and overrides)")
    p.add_argument("--cpus", type=int, help="CPUs Ray may use (default: all)")
    p.add_argument("--cpus-per-site", type=int, default=1)
    p.add_argument("--gpus-per-site", type=float, help="GPU share per site (default 1/N with CUDA, else 0)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd)
