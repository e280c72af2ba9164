"""``fedmed predict``: calibrated class probabilities for new patients (no labels)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _cmd_predict(args: argparse.Namespace) -> int:
    from fedmed.checkpoint import load_checkpoint
    from fedmed.predict import predict
    ckpt = load_checkpoint(args.model, config_path=args.config)
    table, info = predict(ckpt, args.input, reference=args.reference)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6f")
    print(f"wrote {out}: {info['samples']} sample(s) from a {info['input']} input; T = "
          f"{info['temperature']:.3f}{'' if info['temperature_fitted'] else ' (not fitted)'}; "
          f"record encoder from the {info['record_encoder']}")
    return 0


def register(subparsers: Any) -> None:
    """``fedmed predict MODEL --input SITE_DIR|IMAGES_DIR|TABLE --out predictions.csv``."""
    p = subparsers.add_parser("predict", help="calibrated class probabilities for new patients (no labels)")
    p.add_argument("model", help="model.pt (local) or best_model.pt / last_model.pt (federated)")
    p.add_argument("--input", required=True, help="site folder, folder of images, or a records table")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--reference", help="federated model: site folder whose training split fits the "
                   "record encoder (default: the input's own rows)")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the checkpoint's own)")
    p.set_defaults(func=_cmd_predict)
