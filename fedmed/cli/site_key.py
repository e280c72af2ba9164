"""``fedmed site-key``: a site's key pair for Flower's node authentication."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmed.certs import create_site_key

__all__ = ["register"]


def register(sub: Any) -> None:
    k = sub.add_parser("site-key", help="create a site's key pair for node authentication")
    k.add_argument("--site", required=True)
    k.add_argument("--out", type=Path, default=Path("keys"))
    k.add_argument("--force", action="store_true", help="replace an existing key pair")

    def run_key(a: Any) -> int:
        priv, pub = create_site_key(a.out, site=a.site, force=a.force)
        print(f"private {priv} (stays at the site)\npublic  {pub} (send to the coordinator: --auth-key)")
        return 0

    k.set_defaults(func=run_key)
