"""The README's security claims are sentences of docs/security.md, word for word."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    return " ".join(re.sub(r"[*`]", "", text).split())


def test_readme_security_claims_match_security_md():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- security-claims")[1].split("<!-- /security-claims -->")[0]
    claims = [line[2:].strip() for line in block.splitlines() if line.startswith("- ")]
    assert len(claims) >= 8
    security = _flat((REPO / "docs" / "security.md").read_text())
    missing = [c for c in claims if _flat(c) not in security]
    assert missing == [], missing


def _architecture_names() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    return set(re.findall(r"`(fedmed(?:\.[A-Za-z_]+)+)", text))


def test_architecture_md_names_modules_that_exist():
    """Every ``fedmed.x.y`` in docs/architecture.md is a module (or a name in one)."""
    import importlib
    import importlib.util

    def exists(name: str) -> bool:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
            module, attr = name.rsplit(".", 1)
            return hasattr(importlib.import_module(module), attr)
        except ModuleNotFoundError:
            return False

    names = sorted(_architecture_names())
    assert len(names) > 40 and not exists("fedmed.simulate") and exists("fedmed.cli.COMMANDS")
    missing = [n for n in names if not exists(n)]
    assert missing == [], missing


def test_architecture_md_places_every_module_of_the_package():
    names = _architecture_names()
    modules = [p.stem if p.is_file() else p.name for p in sorted((REPO / "fedmed").iterdir())
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()]
    modules += [f"server.{p.stem}" for p in sorted((REPO / "server").glob("*.py")) if p.stem != "__init__"]
    modules += [f"client.{p.stem}" for p in sorted((REPO / "client").glob("*.py")) if p.stem != "__init__"]
    text = (REPO / "docs" / "architecture.md").read_text()
    unplaced = [m for m in modules if not any(n == f"fedmed.{m}" or n.startswith(f"fedmed.{m}.") for n in names)
                and f".{m.rsplit('.', 1)[-1]}`" not in text]
    assert len(modules) > 40 and unplaced == [], unplaced
