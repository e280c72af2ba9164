"""``fedmed export``: the model as ONNX or TorchScript plus a preprocessing sidecar."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "FORMAT_SUFFIXES"]

# fedmed.export.FORMATS, spelled here so `fedmed --help` needs no torch (tests/test_cli_lazy.py checks both agree)
FORMAT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts"}


def _cmd_export(args: argparse.Namespace) -> int:
    from fedmed.checkpoint import load_checkpoint
    from fedmed.export import export_model
    ckpt = load_checkpoint(args.model, config_path=args.config)
    out = Path(args.out) if args.out else ckpt.path.with_suffix(FORMAT_SUFFIXES[args.format])
    model_path, meta_path = export_model(ckpt, out, fmt=args.format)
    print(f"wrote {model_path} and its preprocessing sidecar {meta_path} "
          f"(T = {ckpt.calibrated_temperature:.3f}{'' if ckpt.temperature is not None else ', not fitted'})")
    return 0


def register(subparsers: Any) -> None:
    """``fedmed export MODEL --format onnx|torchscript [--out FILE]``."""
    p = subparsers.add_parser("export", help="the model as ONNX or TorchScript plus a preprocessing sidecar")
    p.add_argument("model", help="model.pt (local) or best_model.pt / last_model.pt (federated)")
    p.add_argument("--format", choices=sorted(FORMAT_SUFFIXES), default="onnx")
    p.add_argument("--out", help="model file to write (default: beside the checkpoint); sidecar = FILE.json")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the checkpoint's own)")
    p.set_defaults(func=_cmd_export)
