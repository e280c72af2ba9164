"""fedmed-server --evaluate over three real SuperNodes on loopback: metrics only, no training."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fedmed.checkpoint import load_checkpoint
from fedmed.evaluate import evaluate_model
from fedmed.flower import free_port

BIN = Path(sys.executable).parent
SITES = ["hospital_a", "hospital_b", "hospital_c"]
TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Real SuperNodes end to end (about 85 s on a 2-core AMD EPYC); evaluating a saved model at sites
# and their intervals are tested in-process in tests/test_evaluate.py. `make test-slow` runs it.
@pytest.mark.slow
def test_server_evaluates_a_saved_model_at_three_sites(synth_root, cache_dir, tmp_path):
    deploy = _load("deploy_tests", TESTS / "server" / "test_deployment.py")
    ckpt_path = _load("export_tests", TESTS / "test_export.py").trained_checkpoint(synth_root, tmp_path / "model")
    out, port, env = tmp_path / "eval", free_port(), deploy._env(cache_dir)
    log = open(tmp_path / f"server-{time.time_ns()}.log", "w")
    server = subprocess.Popen(
        [str(BIN / "fedmed-server"), "--evaluate", str(ckpt_path), "--insecure", "--host", "127.0.0.1",
         "--port", str(port), "--out", str(out), "--min-sites", "3", "--round-timeout", "240",
         "--bootstrap", "100"], env=env, stdout=log, stderr=subprocess.STDOUT)
    clients = [deploy._client(s, synth_root, tmp_path / "sites" / s, port, env, "--once", "--grace", "2")
               for s in SITES]
    try:
        assert server.wait(600) == 0, deploy._logs(tmp_path)
        for c in clients:
            assert c.wait(120) == 0, deploy._logs(tmp_path)
    finally:
        deploy._kill_all(server, *clients)

    res = json.loads((out / "evaluation.json").read_text())
    assert sorted(res["sites"]) == SITES and res["sites_failed"] == {}
    assert res["temperature"] == pytest.approx(1.7) and res["split"] == "test"
    # each site's numbers are exactly what `fedmed evaluate` computes there on its test split
    ckpt = load_checkpoint(ckpt_path)
    for site in SITES:
        local = evaluate_model(ckpt, [synth_root / site], split="test", n_boot=100)["sites"][site]
        remote = res["sites"][site]
        assert remote["n_samples"] == local["n_samples"] > 10
        for k in ("accuracy", "auc", "balanced_accuracy"):
            for part in ("value", "lo", "hi"):
                assert remote["metrics"][k][part] == pytest.approx(local["metrics"][k][part], abs=1e-9), (site, k)
    pooled = res["pooled"]["metrics"]["auc"]
    n = {s: res["sites"][s]["n_samples"] for s in SITES}
    weighted = sum(res["sites"][s]["metrics"]["auc"]["value"] * n[s] for s in SITES) / sum(n.values())
    assert pooled["value"] == pytest.approx(weighted) and pooled["lo"] < pooled["value"] < pooled["hi"]
    assert pooled["sites"] == 3 and res["pooled"]["n_samples"] == sum(n.values())
    assert "Federated evaluation" in (out / "evaluation.html").read_text()
    # the sites' own audit logs: one evaluate.external reply each, nothing trained, no ids
    for site in SITES:
        audit = (tmp_path / "sites" / site / "audit.jsonl").read_text()
        lines = [json.loads(line) for line in audit.splitlines()]
        assert [x["type"] for x in lines] == ["evaluate.external"], lines
        assert set(lines[0]["keys"]) == {"metrics", "site"}  # no arrays leave the site
        ids = pd.read_csv(synth_root / site / "records.csv", dtype=str)["patient_id"]
        assert not any(pid in audit for pid in ids)
