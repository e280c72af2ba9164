"""``fedmed explain``: Grad-CAM, record attention and modality shares for one or more sites."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedmed.errors import UsageError

__all__ = ["register"]


def _cmd_explain(args: argparse.Namespace) -> int:
    from fedmed.explain.report import explain, format_value, summarise_sites, summary_table
    ckpt = Path(args.checkpoint)
    site_dirs = [Path(d) for d in args.site_dir]
    names = [d.name for d in site_dirs]
    if len(set(names)) != len(names):
        raise UsageError(f"--site-dir names a site twice: {names}")
    base = Path(args.out) if args.out else ckpt.parent
    summaries: dict[str, dict[str, Any]] = {}
    for site_dir in site_dirs:
        out = (base / f"explain-{site_dir.name}") if (len(site_dirs) > 1 or not args.out) else base
        path = explain(ckpt, site_dir=site_dir, out_dir=out, config_path=args.config,
                       patients=args.patients, errors=args.errors, pooled=args.pooled)
        summaries[site_dir.name] = json.loads((out / "explain.json").read_text())["site_summary"]
        print(f"wrote {path}")
    if len(site_dirs) == 1:
        for k, v in summaries[names[0]].items():
            print(f"{k:40s} {format_value(v)}")
        return 0
    rows = summarise_sites(summaries)
    (base / "explain-summary.json").write_text(json.dumps(rows, indent=2, default=float))
    print("\n" + summary_table(rows))
    print("\ncentral mass: share of Grad-CAM heat in the middle 50% x 50% (0.25 = uniform), "
          "over correctly classified test images")
    print(f"wrote {base / 'explain-summary.json'}")
    return 0


def register(subparsers: Any) -> None:
    """``fedmed explain CHECKPOINT --site-dir DIR [--site-dir DIR ...] [--patients N] [--errors N]``."""
    p = subparsers.add_parser("explain", help="Grad-CAM, record attention and modality shares for a site")
    p.add_argument("checkpoint", help="model.pt (local) or best_model.pt / last_model.pt (federated)")
    p.add_argument("--site-dir", required=True, action="append",
                   help="a site folder whose test split to explain (repeat for several sites: "
                        "one folder each and a summary table over all)")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the checkpoint's own)")
    p.add_argument("--patients", type=int, default=8, help="explain the first N test samples")
    p.add_argument("--errors", type=int, default=0, help="explain the N most confident errors instead")
    p.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=None,
                   help="the model was trained on the config's sites pooled (default: from metrics.json)")
    p.add_argument("--out", help="output folder (default: explain-<site> beside the checkpoint; "
                                 "with several sites, the folder that holds them)")
    p.set_defaults(func=_cmd_explain)
