"""The coordinator's safe defaults (issue 13, deliverable 6): where it listens, plain HTTP,
and what a SIGKILLed coordinator leaves behind. Real processes on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedmed.flower import free_port, server_healthy
from fedmed.server import cli
from fedmed.server.leftovers import PID_FILE

BIN = Path(sys.executable).parent


def test_the_coordinator_listens_on_loopback_unless_told():
    assert cli.build_parser().parse_args([]).host == "127.0.0.1"


@pytest.mark.parametrize(("host", "extra", "ok"), [
    ("127.0.0.1", [], True),
    ("localhost", [], True),
    ("0.0.0.0", [], False),
    ("0.0.0.0", ["--allow-insecure-remote"], True),
    ("192.0.2.10", [], False),
])
def test_plain_http_off_loopback_needs_an_explicit_flag(host, extra, ok, capsys):
    args = cli.build_parser().parse_args(["--insecure", "--host", host, *extra])
    if ok:
        assert cli._tls(args) is None
        assert ("WARNING: plain HTTP" in capsys.readouterr().err) == (host == "0.0.0.0")
    else:
        with pytest.raises(ValueError, match="--allow-insecure-remote"):
            cli._tls(args)


def _server(cfg_path: Path, out: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(BIN / "fedmed-server"), "-c", str(cfg_path), "--insecure", "--port", str(port),
                             "--out", str(out), *extra], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_submitted(log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "federation submitted" in log.read_text():
            return
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-3000:])


def _flower_pids(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _runners_of(server_pid: int) -> list[int]:
    """Live ServerApp runners (server/warm.py) started by the fedmed-server ``server_pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"fedmed.server.warm" in cmd and f"{server_pid}".encode() in cmd and state != "Z":
                out.append(int(entry.name))
    return out


def test_a_restarted_coordinator_stops_what_a_killed_one_left(synth_config, tmp_path):
    """SIGKILL the server while its SuperLink hangs (SIGSTOP): the SuperLink survives (Flower
    1.42 stops itself only when it can still run); the restarted server on the same folder finds
    it, stops it and runs. The killed server's ServerApp runner ends with it (Linux's parent-death
    signal), holding the run's task or not."""
    _, cfg_path = synth_config(federation={"rounds": 1, "min_sites": 1})
    out, port = tmp_path / "run", free_port()
    first = _server(cfg_path, out, port, tmp_path / "first.log")
    second = None
    try:
        _wait_submitted(tmp_path / "first.log")
        group = json.loads((out / PID_FILE).read_text())["group"]
        os.killpg(group, signal.SIGSTOP)  # the SuperLink hangs...
        runners = _runners_of(first.pid)
        assert runners, "no ServerApp runner found: this test would prove nothing about it"
        first.send_signal(signal.SIGKILL)  # ...when its server is killed
        first.wait(10)
        time.sleep(2)
        left = _flower_pids(group)
        assert left, "a SIGKILLed server left nothing behind: this test would prove nothing"
        deadline = time.monotonic() + 60
        while _runners_of(first.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _runners_of(first.pid) == [], "the killed server's ServerApp runner outlived it"
        second = _server(cfg_path, out, port, tmp_path / "second.log")
        _wait_submitted(tmp_path / "second.log")
        text = (tmp_path / "second.log").read_text()
        assert "a killed earlier server left running" in text, text
        assert _flower_pids(group) == []
        assert server_healthy(f"127.0.0.1:{port}")  # the new coordinator serves the sites' port
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    assert not (out / PID_FILE).exists()  # a server that exits cleanly releases the folder


def _control_api_only_on_loopback(out: Path, port: int, tmp_path: Path) -> None:
    """Run submission (Flower's Control API) answers on the server's loopback, not on the sites' port."""
    from fedmed.flower import flower_env, flwr, write_connection
    from fedmed.server.gateway import REFUSED

    outsider = tmp_path / "outsider-flwr"
    write_connection(outsider, name="coordinator", address=f"127.0.0.1:{port}")
    res = flwr(["ls", "coordinator", "--format", "json"], env=flower_env(outsider), timeout=60)
    assert res.returncode != 0 or '"success": false' in res.stdout.replace(" ", "").replace('":false', '": false'), \
        res.stdout
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/control/list-runs",
                                                      data=b"", method="POST"), timeout=10)
    assert info.value.code == 403 and info.value.read().decode() == REFUSED
    own = flwr(["ls", "fedmed", "--format", "json"], env=flower_env(out / ".flwr"), timeout=60)
    assert own.returncode == 0 and "fedmed" in own.stdout, own.stdout + own.stderr  # the operator's own CLI works


def test_a_second_coordinator_refuses_to_start_beside_a_live_one(synth_config, tmp_path):
    _, cfg_path = synth_config(federation={"rounds": 1, "min_sites": 1})
    out, port = tmp_path / "run", free_port()
    first = _server(cfg_path, out, port, tmp_path / "first.log")
    try:
        _wait_submitted(tmp_path / "first.log")
        second = _server(cfg_path, out, free_port(), tmp_path / "second.log")
        assert second.wait(60) == 2
        text = (tmp_path / "second.log").read_text()
        assert f"another fedmed-server (pid {first.pid}) is running" in text, text
        assert first.poll() is None and server_healthy(f"127.0.0.1:{port}")  # the first is untouched
        _control_api_only_on_loopback(out, port, tmp_path)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)


def test_too_few_sites_ends_with_one_clear_line(synth_config, tmp_path):
    _, cfg_path = synth_config(federation={"rounds": 1, "min_sites": 2, "round_timeout": 5})
    out, port = tmp_path / "run", free_port()
    server = _server(cfg_path, out, port, tmp_path / "server.log")
    assert server.wait(180) == 1
    text = (tmp_path / "server.log").read_text()
    assert "fedmed-server: federation ended (finished:failed): only 0 of the 2 required sites connected " \
           "within 5s" in text, text
    assert "Traceback" not in text and "INFO" not in text, text
    assert "Traceback" in (out / "run.log").read_text()  # the details are kept in the run's log
