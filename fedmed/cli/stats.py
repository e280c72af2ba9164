"""``fedmed stats``: federated statistics of every site in the simulation engine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.cli._common import add_config_args

__all__ = ["register"]


def _cmd_stats(args: argparse.Namespace) -> int:
    import time

    from fedmed.config import load_config
    from fedmed.experiments.simulate import simulate_stats
    from fedmed.stats import StatsRequest

    cfg = load_config(args.config, args.overrides)
    req = StatsRequest(k=args.k, bins=args.bins, epsilon=args.epsilon, images=not args.no_images)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / f"{cfg.name}-stats-{time.strftime('%Y%m%d-%H%M%S')}"
    res = simulate_stats(cfg, req, out_dir=out, sites=args.site, total_cpus=args.cpus)
    for site, st in {**res["sites"], "pooled": res["pooled"]["counts"]}.items():
        print(f"{site:16s} patients {st.get('n.patients', 0):>8.0f}  samples {st.get('n.samples', 0):>8.0f}  "
              f"images {st.get('n.images', 0):>8.0f}")
    for site, why in res["failed"].items():
        print(f"{site:16s} FAILED: {why}")
    print(f"\nwrote {out / 'stats.html'} and {out / 'stats.json'} (deployment: fedmed-server --stats)")
    return 1 if res["failed"] else 0


def register(sub: Any) -> None:
    st = sub.add_parser("stats", help="federated statistics of every site (simulation; aggregates only, "
                        "cells below k suppressed at the site)")
    add_config_args(st)
    st.add_argument("--site", action="append", help="site name (repeat; default data.sites, else all)")
    st.add_argument("--k", type=int, default=5, help="smallest count shown (each site may raise it)")
    st.add_argument("--bins", type=int, default=10, help="histogram bins over data.ranges")
    st.add_argument("--epsilon", type=float, help="Gaussian noise with this ε (default: none)")
    st.add_argument("--no-images", action="store_true", help="skip image properties")
    st.add_argument("--cpus", type=int, help="CPUs Ray may use")
    st.add_argument("--out", help="output folder")
    st.set_defaults(func=_cmd_stats)
