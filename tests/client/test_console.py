"""What a person at a site reads: a bad address is refused at once, an unreachable server is named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmed.flower import free_port

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("server", ["9092", "localhost", "host:port", "http://coordinator:9092", "::1:9092"])
def test_a_malformed_server_address_is_refused_at_once(server, tmp_path):
    (tmp_path / "data").mkdir()
    t0 = time.monotonic()
    res = subprocess.run([str(BIN / "fedmed-client"), "--site", "a", "--data-dir", str(tmp_path / "data"),
                          "--insecure", "--server", server, "--work-dir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is not HOST:PORT" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 30 and not (tmp_path / "w" / "supernode.log").exists()


def test_a_site_that_cannot_reach_its_server_says_so_every_few_seconds(tmp_path):
    (tmp_path / "data").mkdir()
    port = free_port()  # nothing listens there
    console = tmp_path / "console.log"
    proc = subprocess.Popen([str(BIN / "fedmed-client"), "--site", "a", "--data-dir", str(tmp_path / "data"),
                             "--insecure", "--server", f"127.0.0.1:{port}", "--work-dir", str(tmp_path / "w")],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=open(console, "w"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and console.read_text().count("cannot reach the coordinator") < 2:
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = console.read_text()
    line = f"fedmed-client: cannot reach the coordinator at 127.0.0.1:{port}: connection refused"
    assert text.count(line) >= 2, text
