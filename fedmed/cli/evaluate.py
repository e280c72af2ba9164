"""``fedmed evaluate``: external validation of a saved model on whole sites."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "SPLIT_CHOICES"]

# fedmed.evaluate.SPLITS, spelled here so `fedmed --help` needs no torch (tests/test_cli_lazy.py checks both agree)
SPLIT_CHOICES = ("all", "test")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedmed.checkpoint import load_checkpoint
    from fedmed.evaluate import evaluate_model, metrics_table
    ckpt = load_checkpoint(args.model, config_path=args.config)
    out = Path(args.out) if args.out else ckpt.path.parent / f"evaluation-{args.split}"
    result = evaluate_model(ckpt, args.site_dir, split=args.split, n_boot=args.bootstrap, seed=args.seed,
                            out_dir=out, image_roots=args.image_root)
    print(metrics_table(result))
    print(f"\nT = {result['temperature']:.3f}; {args.bootstrap} patient-level bootstrap replicates; "
          f"wrote {out / 'evaluation.html'} and evaluation.json")
    return 0


def register(subparsers: Any) -> None:
    """``fedmed evaluate MODEL --site-dir DIR [--site-dir ...] [--split all|test]``."""
    p = subparsers.add_parser("evaluate", help="external validation: metrics with bootstrap CIs per site and pooled")
    p.add_argument("model", help="model.pt (local) or best_model.pt / last_model.pt (federated)")
    p.add_argument("--site-dir", action="append", required=True, help="site folder (repeat for several)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="all",
                   help="all: every row (a new site); test: the site's own test split as a federation makes it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (patients resampled)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--image-root", action="append", default=[],
                   help="folder outside the site folders that images.csv may point into (repeat)")
    p.add_argument("--out", help="output folder (default: beside the checkpoint)")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the checkpoint's own)")
    p.set_defaults(func=_cmd_evaluate)
