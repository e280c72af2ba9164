"""``fedmed train-local``: train and evaluate on one site or a pooled set."""

from __future__ import annotations

import argparse
from typing import Any

from fedmed.cli._common import add_config_args

__all__ = ["register"]


def _cmd_train_local(args: argparse.Namespace) -> int:
    from fedmed.config import load_config
    from fedmed.experiments.local import train_local

    cfg = load_config(args.config, args.overrides)
    sites = None if args.pooled or not args.site else args.site
    result = train_local(cfg, sites=sites, out_dir=args.out)
    print(result["table"])
    print(f"\nsaved {result['out_dir']}/metrics.json and model.pt")
    return 0


def register(sub: Any) -> None:
    tl = sub.add_parser("train-local", help="train and evaluate on one site or a pooled set")
    add_config_args(tl)
    tl.add_argument("--site", action="append", help="site name (repeat to pool several)")
    tl.add_argument("--pooled", action="store_true", help="pool all sites of the config")
    tl.add_argument("--out", help="output folder (default: <output_dir>/<name>/local-<site>)")
    tl.set_defaults(func=_cmd_train_local)
