"""Real deployment on loopback: fedmed-server (Flower SuperLink) + fedmed-client (SuperNodes).

Every process is real; each test has its own ports, run folder and Flower home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from fedmed.flower import free_port

BIN = Path(sys.executable).parent
SITES = ["hospital_a", "hospital_b", "hospital_c"]


def _env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", FEDMED_CACHE_DIR=str(cache_dir), FLWR_TELEMETRY_ENABLED="0",
               PYTHONUNBUFFERED="1")
    return env


def _server(cfg_path: Path, out: Path, port: int, env: dict[str, str], *extra: str) -> subprocess.Popen:
    log = open(out.parent / f"server-{time.time_ns()}.log", "w")
    return subprocess.Popen(
        [str(BIN / "fedmed-server"), "-c", str(cfg_path), "--insecure", "--host", "127.0.0.1",
         "--port", str(port), "--out", str(out), *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT)


def _client(site: str, root: Path, work: Path, port: int, env: dict[str, str], *extra: str) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "client.log", "a")
    return subprocess.Popen(
        [str(BIN / "fedmed-client"), "--site", site, "--data-dir", str(root / site),
         "--server", f"127.0.0.1:{port}", "--insecure", "--work-dir", str(work), *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT)


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(tmp_path.rglob("*.log")) if p.is_file())


def _wait_state(out: Path, found, timeout: float, what: str):
    """Block until ``found(state)`` of the checkpointed federation state is truthy; its value."""
    import pickle

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = found(pickle.loads((out / "state.pkl").read_bytes()))
            if value:
                return value
        except (FileNotFoundError, EOFError, pickle.UnpicklingError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def _wait_round(out: Path, rnd: int, timeout: float) -> None:
    """Block until the federation has checkpointed round ``rnd``."""
    _wait_state(out, lambda st: st.round >= rnd, timeout, f"round {rnd}")


def _first_round_trained_by(out: Path, site: str, timeout: float) -> int:
    """Block until ``site`` has trained in a checkpointed round; that round's number.

    With ``min_sites`` below the number of sites, round 1 starts once enough sites are in: a
    site that registers a moment later trains from round 2 on.
    """
    return int(_wait_state(out, lambda st: next((r["round"] for r in st.history
                                                 if site in r.get("sites_trained", [])), 0),
                           timeout, f"a round trained by {site}"))


def _kill_all(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_three_sites_federate_for_real(synth_config, synth_root, cache_dir, tmp_path):
    _, cfg_path = synth_config(federation={"rounds": 3, "evaluate_every": 3})
    out, port, env = tmp_path / "run", free_port(), _env(cache_dir)
    server = _server(cfg_path, out, port, env, "--rounds", "3")
    clients = [_client(s, synth_root, tmp_path / "sites" / s, port, env, "--once", "--grace", "2")
               for s in SITES]
    try:
        assert server.wait(600) == 0, _logs(tmp_path)
        for c in clients:  # each site leaves by itself once the coordinator is gone
            assert c.wait(120) == 0, _logs(tmp_path)
    finally:
        _kill_all(server, *clients)

    state_rounds = json.loads((out / "summary.json").read_text())
    assert state_rounds["rounds"] == 3
    # The console a person reads: one progress line per round, the round table once, and
    # Flower's own INFO lines only in the run's log file.
    console = next(tmp_path.glob("server-*.log")).read_text()
    assert [line.split(":")[0] for line in console.splitlines() if line.startswith("round ") and "/3:" in line] \
        == ["round 1/3", "round 2/3", "round 3/3"], console
    assert console.count("round  sites  rejected") == 1, console
    assert "INFO" not in console and "\x1b[" not in console, console
    assert "configure_train" in (out / "run.log").read_text()
    # Learning happened: the global model beats chance on the server's held-out set.
    final = state_rounds["final"]
    assert final["central_test_auc"] > 0.6, final
    # The federation ended with temperature scaling over the real SuperNodes.
    cal = state_rounds["calibration"]
    assert cal["fit"]["sites"] == SITES and cal["sites_failed"] == {} and 0.05 <= cal["temperature"] <= 20
    assert sorted(cal["sites"]) == SITES and 0 <= cal["pooled"]["ece_after"] <= 1
    # Checkpoints: last and best global models load as plain state dicts.
    for name in ("last_model.pt", "best_model.pt"):
        ckpt = torch.load(out / name, weights_only=False)
        assert ckpt["model"] and "config" in ckpt
    # MLflow holds one run with per-round central metrics and per-site metrics.
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    run_id = (out / "mlflow_run_id").read_text().strip()
    hist = client.get_metric_history(run_id, "central_val_auc")
    assert sorted(m.step for m in hist) == [1, 2, 3]
    metrics = client.get_run(run_id).data.metrics
    assert any(k.startswith("site.hospital_a.") for k in metrics), sorted(metrics)
    assert (out / "report.html").exists() and (out / "curves.png").exists()
    # What left each site (its own audit log): only the reply vocabulary, no patient ids.
    for site in SITES:
        audit = (tmp_path / "sites" / site / "audit.jsonl").read_text()
        lines = [json.loads(line) for line in audit.splitlines()]
        assert len(lines) >= 4 and all(set(x["keys"]) <= {"arrays", "metrics", "site"} for x in lines)
        # calibration: fit, then measure; the fit comes with the last round's evaluation when that
        # round's model is the one calibrated
        ends = (["evaluate", "evaluate.calibration"] if cal["fit"].get("asked") == "with the last round's evaluation"
                else ["evaluate.calibration"] * 2)
        assert cal["fit"].get("asked") is None or cal["round"] == 3
        assert [x["type"] for x in lines[-2:]] == ends
        ids = pd.read_csv(synth_root / site / "records.csv", dtype=str)["patient_id"]
        assert not any(pid in audit for pid in ids)


@pytest.mark.slow
def test_site_killed_and_server_resumed(synth_config, synth_root, cache_dir, tmp_path):
    """One site dies after its first round; the server stops a round later and resumes to round 4."""
    _, cfg_path = synth_config(federation={"rounds": 4, "min_sites": 2, "evaluate_every": 4,
                                           "round_timeout": 180})
    out, port, env = tmp_path / "run", free_port(), _env(cache_dir)
    server = _server(cfg_path, out, port, env)
    clients = {s: _client(s, synth_root, tmp_path / "sites" / s, port, env) for s in SITES}
    try:
        first = _first_round_trained_by(out, "hospital_c", 400)  # round 1, unless it joined late
        clients["hospital_c"].kill()  # the site crashes (its node goes down with it)
        _wait_round(out, first + 1, 400)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) != 0  # interrupted, not completed
        server = _server(cfg_path, out, port, env, "--resume")
        assert server.wait(900) == 0, _logs(tmp_path)
    finally:
        _kill_all(server, *clients.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4
    import pickle

    state = pickle.loads((out / "state.pkl").read_bytes())
    assert [r["round"] for r in state.history] == [1, 2, 3, 4]
    assert set(state.history[first - 1]["sites_trained"]) == set(SITES)
    assert "hospital_c" not in state.history[-1]["sites_trained"]
    assert len(state.history[-1]["sites_trained"]) == 2


@pytest.mark.slow
def test_flowers_own_superexec_runs_the_federation_when_the_warm_runner_cannot(
        synth_config, synth_root, cache_dir, tmp_path):
    """A Flower release without what server/warm.py needs: the same federation through Flower's SuperExec."""
    _, cfg_path = synth_config(federation={"rounds": 1, "evaluate_every": 1})
    out, port = tmp_path / "run", free_port()
    env = {**_env(cache_dir), "FEDMED_SERVER_COMPAT_REQUIRE": "flwr.superlink.gone_in_next_release:run_serverapp"}
    server = _server(cfg_path, out, port, env, "--rounds", "1")
    clients = [_client(s, synth_root, tmp_path / "sites" / s, port, env, "--once", "--grace", "5") for s in SITES]
    try:
        assert server.wait(600) == 0, _logs(tmp_path)
    finally:
        _kill_all(server, *clients)
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    assert (out / "superexec.log").exists()  # Flower's SuperExec ran, started by fedmed-server
    console = next(tmp_path.glob("server-*.log")).read_text()
    assert "Flower's SuperExec runs the ServerApp instead" in console and "round 1/1" in console, console
