"""``fedmed compare``: local-only vs pooled vs federated strategies, over seeds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _cmd(args: argparse.Namespace) -> int:
    from fedmed.config import load_config
    from fedmed.experiments.compare import compare

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / f"{cfg.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    res = compare(cfg, seeds=args.seeds, strategies=args.strategies, out_dir=out, sites=args.sites,
                  proximal_mu=args.mu, num_cpus_per_site=args.cpus_per_site, total_cpus=args.cpus,
                  skip_local=args.skip_local, resume=args.resume)
    print((res["out_dir"] / "comparison.md").read_text())
    print(f"fedmed compare: wrote {res['out_dir']}/comparison.md, .csv and .png", flush=True)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("compare", help="local-only vs pooled vs federated strategies, over seeds")
    p.add_argument("--config", "-c", default="configs/default.yaml", help="YAML config file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedadam"])
    p.add_argument("--sites", nargs="+", help="site folders (default data.sites, else all)")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal_mu when the config has 0")
    p.add_argument("--cpus-per-site", type=int, default=1)
    p.add_argument("--cpus", type=int, help="CPUs Ray may use for the federations (default: all)")
    p.add_argument("--skip-local", action="store_true", help="only the federated strategies")
    p.add_argument("--out", help="output folder (default <output_dir>/<name>-compare-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the federations an interrupted compare left in --out (same config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd)
