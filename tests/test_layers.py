"""The layer rule: nothing under ``fedmed/`` but the experiments and the CLI imports the roles.

Layers, top to bottom (docs/architecture.md): ``fedmed.cli`` and ``fedmed.experiments``; the
roles ``fedmed.server`` and ``fedmed.client`` (which do not import each other); the core
(everything else under ``fedmed/``). A lower layer never imports a higher one, lazily inside a
function included. One check: import-linter's ``layers`` contract in pyproject.toml
(``[tool.importlinter]``; the test extra installs it, so a missing tool fails here, it is not skipped).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _installed_layout(tmp_path: Path) -> Path:
    """The package as installed: server/ and client/ inside fedmed/ (grimp reads folders)."""
    tree = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "fedmed", tree / "fedmed", ignore=skip)
    shutil.copytree(ROOT / "server", tree / "fedmed" / "server", ignore=skip)
    shutil.copytree(ROOT / "client", tree / "fedmed" / "client", ignore=skip)
    return tree


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


def test_import_linter_layers_contract_is_kept_and_can_break(tmp_path):
    tree = _installed_layout(tmp_path)
    res = _lint_imports(tree)
    assert res.returncode == 0 and "1 kept, 0 broken" in res.stdout, res.stdout + res.stderr
    # the same tree with one core module reaching into the server (lazily) must fail
    metrics = tree / "fedmed" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef _bad():\n    from fedmed.server import report\n")
    res = _lint_imports(tree)
    assert res.returncode != 0 and "0 kept, 1 broken" in res.stdout, res.stdout + res.stderr
    assert "fedmed.metrics -> fedmed.server.report" in res.stdout, res.stdout


def test_every_package_folder_is_in_pyprojects_package_list():
    """A sub-package missing from ``[tool.setuptools] packages`` would be left out of the wheel."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("fedmed", *p.parent.relative_to(ROOT / "fedmed").parts))
             for p in (ROOT / "fedmed").rglob("__init__.py")} | {"fedmed.server", "fedmed.client"}
    assert found == listed
