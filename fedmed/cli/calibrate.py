"""``fedmed calibrate``: temperature scaling of a saved model on a site's val split."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.errors import UsageError

__all__ = ["register"]


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from fedmed.calibration import calibrate
    from fedmed.checkpoint import load_checkpoint
    from fedmed.device import select_device
    from fedmed.heldout import site_split, trained_pooled

    ckpt = Path(args.checkpoint)
    read = load_checkpoint(ckpt, config_path=args.config)
    model, cfg = read.build_model(), read.config
    if cfg.model.multilabel:
        raise UsageError("temperature scaling here is for single-label (softmax) models")
    pooled = trained_pooled(ckpt) if args.pooled is None else args.pooled
    enc = read.encoder
    splits = site_split(cfg, args.site_dir, split=("val", "test"), pooled=pooled, encoder_state=enc)
    loaders = {s: DataLoader(d, batch_size=128) for s, d in splits.items()}
    where = Path(args.site_dir).name if args.site_dir else "all-sites"
    out = Path(args.out) if args.out else ckpt.parent / f"calibration-{where}"
    res = calibrate(model, loaders["val"], loaders["test"], device=select_device(cfg.train.device),
                    out_dir=out, title=f"{cfg.name} on {where}")
    for k, v in res.items():
        print(f"{k:12s} {v:.4f}" if isinstance(v, float) else f"{k:12s} {v}")
    print(f"\nwrote {out / 'calibration.html'}")
    return 0


def register(subparsers: Any) -> None:
    """``fedmed calibrate CHECKPOINT [--site-dir DIR] [--config CFG] [--out DIR]``."""
    p = subparsers.add_parser("calibrate", help="temperature scaling on a site's val split, ECE before/after")
    p.add_argument("checkpoint", help="model.pt (local) or best_model.pt / last_model.pt (federated)")
    p.add_argument("--site-dir", help="site folder: fit on its val split, report on its test split "
                   "(default: the config's sites pooled)")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the checkpoint's own)")
    p.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=None,
                   help="the model was trained on the config's sites pooled (default: from metrics.json)")
    p.add_argument("--out", help="output folder (default: beside the checkpoint)")
    p.set_defaults(func=_cmd_calibrate)
