"""Federated statistics over real SuperNodes: fedmed-server --stats + three fedmed-client sites.

The coordinator asks for k=1 (hostile); every site applies its own floor (k=5) and the run
folder's stats.json holds no cell below 5, no patient id and no row-level value; each site's
audit log shows the one query.statistics reply.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedmed.flower import free_port
from fedmed.stats import SUPPRESSED

BIN = Path(sys.executable).parent
SITES = ["hospital_a", "hospital_b", "hospital_c"]
RANGES = {"age": [0, 120], "crp": [0, 300], "wbc": [0, 40], "heart_rate": [20, 220],
          "temperature": [30, 45], "spo2": [50, 100]}


def _counts(stats: dict) -> list[float]:
    return [float(x) for key, v in stats.items()
            if not key.endswith((".mean", ".std")) and not key.startswith(("stats.", "privacy."))
            for x in (v if isinstance(v, list) else [v])]


# Real SuperNodes end to end (about 85 s on a 2-core AMD EPYC); the statistics and their privacy
# rules are tested in-process in tests/data/test_stats.py. `make test-slow` runs it.
@pytest.mark.slow
def test_stats_over_real_supernodes(synth_config, synth_root, cache_dir, tmp_path):
    _, cfg_path = synth_config(data={"ranges": RANGES}, federation={"round_timeout": 240})
    out, port = tmp_path / "run", free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDMED_CACHE_DIR=str(cache_dir),
               FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [str(BIN / "fedmed-server"), "-c", str(cfg_path), "--insecure", "--host", "127.0.0.1",
         "--port", str(port), "--out", str(out), "--stats", "--stats-k", "1"],
        env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    clients = []
    for s in SITES:
        work = tmp_path / "sites" / s
        work.mkdir(parents=True)
        clients.append(subprocess.Popen(
            [str(BIN / "fedmed-client"), "--site", s, "--data-dir", str(synth_root / s),
             "--server", f"127.0.0.1:{port}", "--insecure", "--work-dir", str(work), "--once",
             "--grace", "2"], env=env, stdout=open(work / "client.log", "w"), stderr=subprocess.STDOUT))
    logs = lambda: "\n".join(p.read_text(errors="replace")[-3000:]  # noqa: E731
                             for p in sorted(tmp_path.rglob("*.log")))
    try:
        assert server.wait(420) == 0, logs()
        for c in clients:
            assert c.wait(120) == 0, logs()
    finally:
        for p in (server, *clients):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    res = json.loads((out / "stats.json").read_text())
    assert sorted(res["sites"]) == SITES and res["failed"] == {}, res["failed"]
    text = json.dumps(res)
    for site in SITES:
        stats = res["sites"][site]
        assert stats["stats.k"] == 5  # the site's floor, not the server's k=1
        assert all(v == SUPPRESSED or v == 0 or v >= 5 for v in _counts(stats))
        records = pd.read_csv(synth_root / site / "records.csv", dtype=str)
        assert not any(pid in text for pid in records["patient_id"])
        # Counts are whole numbers (a count may equal some age by chance; that is no leak); the
        # only other numbers are means/stds over >= k values, never a patient's min or max.
        assert all(float(v).is_integer() for k, val in stats.items() if k != "img.intensity.hist"
                   and not k.endswith((".mean", ".std")) for v in (val if isinstance(val, list) else [val]))
        summaries = {v for k, v in stats.items() if k.endswith((".mean", ".std"))}
        for col in ("age", "crp"):
            vals = pd.to_numeric(records[col], errors="coerce").dropna()
            assert vals.min() not in summaries and vals.max() not in summaries
        assert stats["n.records"] == len(records) and "img.intensity.hist" in stats
        assert stats.get("dicom.modality.CT", 0) + stats.get("dicom.modality.other", 0) >= 0
        audit = [json.loads(x) for x in (tmp_path / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [a["type"] for a in audit] == ["query.statistics"]
    pooled = res["pooled"]["counts"]
    assert pooled["n.patients"] == sum(res["sites"][s]["n.patients"] for s in SITES)
    assert "q50" in res["pooled"]["numeric"]["age"]
    html = (out / "stats.html").read_text()
    assert html.count("<img") >= 8 and "pooled" in html
