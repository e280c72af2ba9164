"""Flower's usage telemetry never leaves a fedmed process, whatever the environment says and
whichever of flwr and fedmed was imported first (Flower reads its switch once, at import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every outbound HTTP request of the process is recorded and refused; then Flower's own event
# function runs as Flower's simulation and SuperLink call it.
SCRIPT = """
import urllib.error, urllib.request
calls = []
def spy(request, *args, **kwargs):
    calls.append(getattr(request, "full_url", str(request)))
    raise urllib.error.URLError("refused by the test")
urllib.request.urlopen = spy
{imports}
from flwr.supercore.telemetry import EventType, event
event(EventType.PING).result(timeout=60)
print("requests", len(calls), *calls)
"""


@pytest.mark.parametrize("imports, requests", [
    ("import fedmed.server.app", 0),
    ("import flwr.app\nimport fedmed.client.app", 0),  # as in Flower's own ClientApp runner
    ("import flwr.app", 1),  # the positive control: Flower alone posts its event
])
def test_flower_telemetry_is_off_in_fedmed_processes(imports: str, requests: int, tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "1", "FLWR_HOME": str(tmp_path / "flwr")}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(imports=imports)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("requests"))
    assert int(line.split()[1]) == requests, line
