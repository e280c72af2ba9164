"""What several sub-commands share: the ``--config`` file and its ``key=value`` overrides."""

from __future__ import annotations

import argparse

__all__ = ["add_config_args"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="configs/default.yaml", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
