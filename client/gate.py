"""The fallback ClientApp process: Flower's own ``flwr-clientapp`` behind fedmed's app check.

When this Flower release lacks what the warm runner needs, the site runs its SuperNode with
``--isolation subprocess``; Flower's SuperExec then starts ``flwr-clientapp`` by name for
every task. :func:`install_shim` puts a ``flwr-clientapp`` first on the node's PATH that
runs :func:`main`: the submitted FAB is checked (:mod:`fedmed.client.approval`) before
Flower installs or imports anything from it.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from fedmed.client import flower_compat
from fedmed.client.approval import AppRefused, check_fab
from fedmed.client.refusals import log_refusal, run_app_safely

__all__ = ["install_shim", "main"]

log = logging.getLogger("fedmed.client")


def install_shim(bin_dir: Path) -> Path:
    """Write ``bin_dir/flwr-clientapp`` (this interpreter, :func:`main`); put ``bin_dir`` first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / flower_compat.CLIENTAPP_COMMAND
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fedmed.client.gate \"$@\"\n")
    shim.chmod(0o755)
    return shim


class _Refused(Exception):
    """Raised into Flower's runner: its text is the fixed site error reason, nothing else."""


def _check(content: bytes) -> None:
    try:
        check_fab(content)
    except AppRefused as exc:
        raise _Refused(log_refusal(exc)[1]) from None


def _wrap(app):
    """The loaded ClientApp, its exceptions leaving as code+ref only (as in the warm runner)."""
    return lambda message, context: run_app_safely(app, message, context)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = flower_compat.check_gate()
    if problem is not None:  # the site checked this at start; a changed install lands here
        print(f"fedmed site: the app gate cannot run ({problem}); refusing the task", file=sys.stderr)
        sys.exit(1)
    flower_compat.run_gated_clientapp(_check, _wrap)


if __name__ == "__main__":
    main()
