"""``fedmed certs``: a private CA and the coordinator's TLS certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmed.certs import create_certificates

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("certs", help="create a CA and the coordinator's TLS certificate")
    p.add_argument("--out", type=Path, default=Path("certs"))
    p.add_argument("--host", action="append", default=[], help="name or IP the sites dial (repeat)")
    p.add_argument("--days", type=int, default=825)
    p.add_argument("--force", action="store_true", help="replace existing CA/server files")

    def run_certs(a: Any) -> int:
        files = create_certificates(a.out, hosts=a.host, days=a.days, force=a.force)
        print("\n".join(f"{k:8s} {v}" for k, v in files.items()))
        print("give ca.crt to every site; keep ca.key offline")
        return 0

    p.set_defaults(func=run_certs)
