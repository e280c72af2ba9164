"""Type-check the installed ``fedmed`` package with mypy (``make lint`` runs this).

Why not plain ``mypy``: pyproject maps ``fedmed.server`` to ``server/`` and ``fedmed.client`` to
``client/`` (setuptools package-dir), and the default editable install resolves that with an
import hook, which no static checker executes (mypy #13392, setuptools #3518). setuptools'
documented answer for static analysis is the *strict* editable mode: a tree of links
(``build/__editable__.fedmed-*``) with the installed layout. This script builds that tree with the
PEP 660 hook (no install, the venv keeps its normal editable install), points ``MYPYPATH`` at it
and checks ``-p fedmed`` with the settings in ``[tool.mypy]``. The tree holds symlinks to the
source files, so mypy reads the real files; its messages are mapped back to repo paths
(``server/app.py``, not ``build/.../fedmed/server/app.py``). The tree is rebuilt on every run, so
new and moved modules are always seen.

Usage: ``python .ci/typecheck.py [extra mypy args]``; exit status is mypy's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_link_tree() -> Path:
    """Build setuptools' strict editable link tree and return its folder (the import root)."""
    with tempfile.TemporaryDirectory() as wheel_dir:
        code = (
            "from setuptools import build_meta; "
            f"build_meta.build_editable({wheel_dir!r}, config_settings={{'editable_mode': 'strict'}})"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, check=False)
    if proc.returncode != 0:  # setuptools' own log only when it failed: it is long and noisy
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"building the strict editable link tree failed (exit {proc.returncode})")
    trees = sorted((ROOT / "build").glob("__editable__.fedmed-*"), key=lambda p: p.stat().st_mtime)
    if not trees:
        raise SystemExit("setuptools built no build/__editable__.fedmed-* link tree")
    return trees[-1]


def main(argv: list[str]) -> int:
    tree = build_link_tree()
    env = {**os.environ, "MYPYPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *argv], cwd=ROOT, env=env, text=True, capture_output=True, check=False
    )
    prefix = re.compile(r"^(\S+?\.pyi?)(?=:)")

    def real(match: re.Match[str]) -> str:
        path = Path(ROOT, match.group(1))
        return os.path.relpath(path.resolve(), ROOT) if path.is_symlink() else match.group(1)

    for stream, text in ((sys.stdout, proc.stdout), (sys.stderr, proc.stderr)):
        for line in text.splitlines():
            print(prefix.sub(real, line), file=stream)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
