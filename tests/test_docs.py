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
