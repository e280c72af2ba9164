"""The leak test on a real loopback federation: a broken site and a refusing site.

hospital_c's records have the patient id where the label should be (its load fails);
hospital_b's own policy requires DP, which the coordinator's job does not use (it refuses).
Afterwards every file the coordinator wrote — run folder, SuperLink database, MLflow store,
logs, its console — is searched for each of hospital_c's patient ids, image file names and
its folder's path: zero hits. The refusal's reason is shown at both ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from fedmed.flower import free_port
from tests.server.test_deployment import BIN, _env, _kill_all, _logs, _server


def _client(site: str, port: int, work: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(BIN / "fedmed-client"), "--site", site, "--server", f"127.0.0.1:{port}", "--insecure",
         "--work-dir", str(work), "--once", "--grace", "2", *args],
        env=env, stdout=open(work / "client.log", "a"), stderr=subprocess.STDOUT)


def test_nothing_identifying_reaches_the_coordinator(synth_config, synth_root, cache_dir, tmp_path):
    broken = tmp_path / "broken" / "hospital_c"
    shutil.copytree(synth_root / "hospital_c", broken)
    records = pd.read_csv(broken / "records.csv", dtype=str)
    records["label"] = records["patient_id"]
    records.to_csv(broken / "records.csv", index=False)
    images = pd.read_csv(broken / "images.csv", dtype=str)
    secrets = {*records["patient_id"], *(Path(p).name for p in images["image"]), str(broken)}

    site_b = tmp_path / "hospital_b.yaml"
    site_b.write_text(yaml.safe_dump({"site": "hospital_b", "data_dir": str(synth_root / "hospital_b"),
                                      "policy": {"require_dp": True}}))
    _, cfg_path = synth_config(federation={"rounds": 2, "evaluate_every": 2, "min_sites": 3})
    out, port, env = tmp_path / "run", free_port(), _env(cache_dir)
    server = _server(cfg_path, out, port, env, "--rounds", "2")
    work = tmp_path / "sites"
    clients = [_client("hospital_a", port, work / "hospital_a", env, "--data-dir", str(synth_root / "hospital_a")),
               _client("hospital_b", port, work / "hospital_b", env, "--config", str(site_b)),
               _client("hospital_c", port, work / "hospital_c", env, "--data-dir", str(broken))]
    try:
        assert server.wait(600) == 0, _logs(tmp_path)
        for c in clients:
            assert c.wait(120) == 0, _logs(tmp_path)
    finally:
        _kill_all(server, *clients)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final"]["central_test_auc"] > 0.55
    problems = summary["site_problems"]
    # The coordinator's end: which site, the kind, the site's reference and the policy's reason.
    assert "refused by the site" in problems["hospital_b"] and "policy.require_dp" in problems["hospital_b"]
    assert "site-data" in problems["hospital_c"] and "ref" in problems["hospital_c"]
    assert "policy.require_dp" in (out / "report.html").read_text()
    # The site's end: its own log says why, with the same reference.
    site_logs = "\n".join(p.read_text(errors="replace") for p in (work / "hospital_b").rglob("*.log"))
    assert "policy.require_dp" in site_logs and "refused train" in site_logs
    ref = problems["hospital_b"].split("site ref ")[1][:12]
    assert ref in site_logs

    written = [p for p in out.rglob("*") if p.is_file()]
    written += list(tmp_path.glob("server-*.log"))  # the coordinator's console
    assert any(p.name == "mlflow.db" for p in written)
    # The SuperLink keeps its state (every message and reply) in memory, never on this disk.
    assert not [p for p in written if ".db" in p.name and not p.name.startswith("mlflow.db")], written
    # Positive control: what the broken site did send (its error code and reference) reached the
    # coordinator and is found by this very search (in the coordinator's own files, summary.json
    # among them: the SuperLink's copy of the message lived only in its memory).
    ref_c = problems["hospital_c"].split("site ref ")[1][:12].encode()
    assert any(ref_c in p.read_bytes() for p in written)
    hits = {(str(p.relative_to(tmp_path)), s) for p in written for s in secrets
            if s.encode() in p.read_bytes()}
    assert hits == set(), sorted(hits)[:10]
    assert len(written) > 20 and len(secrets) > 100
