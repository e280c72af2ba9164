"""The layer rule: nothing under ``fedmed/`` but the experiments and the CLI imports the roles.

Layers, top to bottom (docs/architecture.md): ``fedmed.cli`` and ``fedmed.experiments``; the
roles ``fedmed.server`` and ``fedmed.client`` (which do not import each other); the core
(everything else under ``fedmed/``). A lower layer never imports a higher one, lazily inside a
function included. Two checks: an AST walk that needs nothing installed, and import-linter's
``layers`` contract in pyproject.toml (``[tool.importlinter]``).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("fedmed.cli", "fedmed.experiments")
ROLES = ("fedmed.server", "fedmed.client")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (``from fedmed import server`` counts as ``fedmed.server``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _core_files() -> list[Path]:
    return [p for p in sorted((ROOT / "fedmed").rglob("*.py"))
            if p.relative_to(ROOT / "fedmed").parts[0] not in ("cli", "experiments")]


# (files, what they must not import)
CASES = {
    "core": (_core_files, ROLES + TOP),
    "server": (lambda: sorted((ROOT / "server").rglob("*.py")), TOP + ("fedmed.client",)),
    "client": (lambda: sorted((ROOT / "client").rglob("*.py")), TOP + ("fedmed.server",)),
}


@pytest.mark.parametrize("layer", sorted(CASES))
def test_no_layer_imports_a_higher_one(layer):
    files, forbidden = CASES[layer]
    found = files()
    assert len(found) > 5, f"no {layer} files found: the test would check nothing"
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in found for line, name in _imports(p)
           if _under(name, forbidden)]
    assert not bad, "\n".join(bad)


def test_the_ast_check_sees_a_lazy_import_inside_a_function(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from fedmed.server.report import write_report\n    from fedmed import client\n")
    assert [n for _, n in _imports(bad) if _under(n, ROLES)] == [
        "fedmed.server.report", "fedmed.server.report.write_report", "fedmed.client"]


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
    pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")
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
