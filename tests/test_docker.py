"""The container setup runs exactly the tested CLIs, as non-root, each site with only its data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedmed.client.cli import build_parser as client_parser
from fedmed.server.cli import build_parser as server_parser

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_command_parses_with_the_real_cli(name):
    cmd = SERVICES[name]["command"]
    parser = {"fedmed-server": server_parser, "fedmed-client": client_parser}[cmd[0]]()
    args = parser.parse_args(cmd[1:])
    if cmd[0] == "fedmed-client":
        assert args.site == name and not args.insecure and args.root_certificates and args.auth_key
    else:
        assert not args.insecure and args.ssl_certfile and len(args.auth_keys) == 3


@pytest.mark.parametrize("name", [s for s in SERVICES if s != "server"])
def test_each_site_mounts_only_its_own_data(name):
    mounts = SERVICES[name]["volumes"]
    data = [m for m in mounts if ":/data" in m]
    assert data == [f"../data/synth/{name}:/data:ro"]
    others = [s for s in SERVICES if s not in (name, "server")]
    assert not any(o in m for m in mounts for o in others)


def test_server_health_check_and_images_pinned_and_non_root():
    assert "healthcheck" in SERVICES["server"]
    for dockerfile in DOCKER.glob("Dockerfile*"):
        text = dockerfile.read_text()
        base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM"))
        assert ":" in base and not base.endswith(":latest"), base
        assert "USER fedmed" in text
