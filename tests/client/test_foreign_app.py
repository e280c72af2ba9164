"""Only approved code runs at a site, on a real loopback federation (issue 13, deliverable 2).

While a fedmed federation runs, a second app — its own ServerApp and a ClientApp that writes
a marker file and would read the site's node config — is submitted to the coordinator with
Flower's own ``flwr run`` and run there by Flower's own SuperExec (fedmed-server's runner takes
only its own run; a hostile operator starts one). The site must refuse it before installing or
importing anything from it, say so on its console and in its log, and send the server a fixed
refusal. Both ways a site runs ClientApps are exercised: fedmed's warm runner, and Flower's own
``--isolation subprocess`` that a site falls back to when the Flower compatibility check
fails (forced here), which must still federate and warn once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmed.client.refusals import REFUSAL_MARK
from fedmed.flower import free_port

BIN = Path(sys.executable).parent

FOREIGN_SERVER = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes, deadline = [], time.time() + 120
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    Path(REPORT).write_text(json.dumps([
        {"error": r.has_error(), "code": r.error.code if r.has_error() else None,
         "reason": r.error.reason if r.has_error() else None} for r in replies]))
"""

FOREIGN_CLIENT = """
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    Path(MARKER).write_text(repr(dict(context.node_config)))  # the site's config path, if it ran
    return Message(RecordDict(), reply_to=msg)
"""

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreign"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "foreign_server:app"
clientapp = "foreign_client:app"

[tool.flwr.app.config]
unused = 1
"""


def _foreign_app(path: Path, *, marker: Path, report: Path) -> Path:
    path.mkdir(parents=True)
    (path / "pyproject.toml").write_text(PYPROJECT)
    (path / "foreign_server.py").write_text(f"REPORT = {str(report)!r}\n" + FOREIGN_SERVER)
    (path / "foreign_client.py").write_text(f"MARKER = {str(marker)!r}\n" + FOREIGN_CLIENT)
    return path


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(tmp_path.rglob("*.log")) if p.is_file())


# The fallback (a Flower without what the warm runner needs) runs Flower's own per-task process:
# the same refusal, three times the start-ups; `make test-slow` runs it.
@pytest.mark.parametrize("mode", ["warm", pytest.param("subprocess-fallback", marks=pytest.mark.slow)])
def test_foreign_app_never_runs_at_the_site(mode, synth_config, synth_root, cache_dir, tmp_path):
    _, cfg_path = synth_config(federation={"rounds": 2, "min_sites": 1, "evaluate_every": 2,
                                           "calibration": "off"},
                               data={"sites": ["hospital_a"]})
    out, port = tmp_path / "run", free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDMED_CACHE_DIR=str(cache_dir), FLWR_TELEMETRY_ENABLED="0",
               PYTHONUNBUFFERED="1")
    site_env = dict(env)
    if mode == "subprocess-fallback":  # play a Flower release that moved an internal the runner needs
        site_env["FEDMED_COMPAT_REQUIRE"] = "flwr.supercore.moved_in_next_release:TaskThing"
    work = tmp_path / "sites" / "hospital_a"
    work.mkdir(parents=True)
    server = subprocess.Popen(
        [str(BIN / "fedmed-server"), "-c", str(cfg_path), "--insecure", "--port", str(port), "--out", str(out)],
        env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    console = work / "console.log"
    client = subprocess.Popen(
        [str(BIN / "fedmed-client"), "--site", "hospital_a", "--data-dir", str(synth_root / "hospital_a"),
         "--server", f"127.0.0.1:{port}", "--insecure", "--work-dir", str(work), "--once", "--grace", "2"],
        env=site_env, stdout=open(console, "w"), stderr=subprocess.STDOUT)
    marker, report = tmp_path / "foreign-ran.txt", tmp_path / "foreign-replies.json"
    superexec: subprocess.Popen | None = None
    try:
        _wait_for(lambda: "federation submitted" in (tmp_path / "server.log").read_text(), 120,
                  "the fedmed federation was not submitted\n" + _logs(tmp_path))
        app = _foreign_app(tmp_path / "foreign", marker=marker, report=report)
        flwr_env = dict(env, FLWR_HOME=str(out / ".flwr"))
        res = subprocess.run([str(BIN / "flwr"), "run", str(app), "fedmed", "--format", "json"],
                             env=flwr_env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr  # Flower accepted the submission...
        # fedmed-server's runner takes only its own run; the hostile operator runs Flower's own
        # SuperExec against the SuperLink (its --isolation process counterpart) for the foreign one.
        internal = re.search(r"run submission on (127\.0\.0\.1:\d+)", (tmp_path / "server.log").read_text())
        assert internal, (tmp_path / "server.log").read_text()
        superexec = subprocess.Popen(
            [str(BIN / "flower-superexec"), "--insecure", "--runtime-api-address", internal.group(1)],
            env=dict(flwr_env, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"),  # it starts flwr-serverapp
            stdout=open(tmp_path / "superexec.log", "w"), stderr=subprocess.STDOUT)
        _wait_for(report.exists, 300, "the foreign ServerApp got no replies\n" + _logs(tmp_path))
        assert server.wait(600) == 0, _logs(tmp_path)  # ...and the fedmed federation still completed
        assert client.wait(120) == 0, _logs(tmp_path)
    finally:
        for p in (server, client, *([superexec] if superexec is not None else [])):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    # ...but its ClientApp never executed at the site.
    assert not marker.exists()
    replies = json.loads(report.read_text())
    assert replies and all(r["error"] for r in replies), replies
    for r in replies:  # a fixed refusal: kind, reference and fixed text, nothing from the site
        assert "fedmed/app-refused ref=" in r["reason"], r
        assert "code is not accepted" in r["reason"]
        assert str(tmp_path) not in r["reason"] and "hospital_a" not in r["reason"]
    text = console.read_text()
    assert f"fedmed-client: {REFUSAL_MARK} a submitted app" in text, text  # the site's console says why
    site_logs = "".join(p.read_text(errors="replace") for p in work.glob("*.log") if p.name != "console.log")
    assert REFUSAL_MARK in site_logs and "foreign_server.py" in site_logs  # the details stay in the site log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    if mode == "subprocess-fallback":
        assert text.count("falling back to Flower's --isolation subprocess") == 1, text
        # the warm runner found this Flower lacking and left before any task: Flower's own flwr-clientapp ran
        runner_log = (work / "clientapp.log").read_text()
        assert "this Flower lacks what it needs" in runner_log and "task done" not in runner_log, runner_log
        assert "Start `flwr-clientapp` process" in (work / "supernode.log").read_text()
    else:
        assert "falling back" not in text
        assert (work / "clientapp.log").exists()
