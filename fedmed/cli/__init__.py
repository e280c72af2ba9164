"""The ``fedmed`` command: data import/synthesis, data checks and local training.

Each sub-command is one module of this package with a ``register(subparsers)`` that adds
its parser; :data:`COMMANDS` lists them in the order ``fedmed --help`` shows. Each reads
YAML config plus ``key=value`` overrides and calls typed library functions; errors in user
input end with a one-line message and exit code 2, not a trace (:mod:`fedmed.errors`).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from fedmed.cli import (
    calibrate,
    certs,
    compare,
    data,
    demo,
    evaluate,
    explain,
    export,
    predict,
    simulate,
    site_key,
    stats,
    train_local,
)

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (data, stats, train_local, demo, simulate, compare, explain, calibrate,
                                    certs, site_key, evaluate, predict, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedmed.errors import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command("fedmed", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
