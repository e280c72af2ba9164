"""``fedmed demo``: a complete federation on the embedded synthetic cohort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmed.experiments.demo import demo

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a complete federation on the embedded synthetic cohort")
    p.add_argument("--config", "-c", type=Path, default=Path("configs/default.yaml"))
    p.add_argument("--rounds", type=int, help="override federation.rounds")
    p.add_argument("--out", type=Path, help="run folder (default <output_dir>/<name>-demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=lambda a: demo(config=a.config, rounds=a.rounds, out=a.out, overrides=a.overrides))
