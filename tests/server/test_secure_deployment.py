"""TLS + site authentication on loopback: invited sites train, an unknown key is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.certs import create_certificates, create_site_key
from fedmed.flower import free_port

BIN = Path(sys.executable).parent
SITES = ["hospital_a", "hospital_b", "hospital_c"]


@pytest.mark.slow
def test_tls_and_site_auth(synth_config, synth_root, cache_dir, tmp_path):
    certs = create_certificates(tmp_path / "certs", hosts=["127.0.0.1", "localhost"])
    keys = {s: create_site_key(tmp_path / "keys", site=s) for s in [*SITES, "intruder"]}
    _, cfg_path = synth_config(federation={"rounds": 2, "evaluate_every": 2})
    out, port = tmp_path / "run", free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDMED_CACHE_DIR=str(cache_dir))
    server = subprocess.Popen(
        [str(BIN / "fedmed-server"), "-c", str(cfg_path), "--host", "127.0.0.1", "--port", str(port),
         "--out", str(out), "--ssl-ca-certfile", str(certs["ca_cert"]), "--ssl-certfile", str(certs["cert"]),
         "--ssl-keyfile", str(certs["key"]), *[a for s in SITES for a in ("--auth-key", str(keys[s][1]))]],
        env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    procs = {}
    for site in [*SITES, "intruder"]:
        data = synth_root / (site if site != "intruder" else "hospital_a")
        procs[site] = subprocess.Popen(
            [str(BIN / "fedmed-client"), "--site", site, "--data-dir", str(data), "--server", f"127.0.0.1:{port}",
             "--root-certificates", str(certs["ca_cert"]), "--auth-key", str(keys[site][0]), "--once",
             "--grace", "5", "--work-dir", str(tmp_path / "sites" / site)],
            env=env, stdout=open(tmp_path / f"{site}.log", "w"), stderr=subprocess.STDOUT)
    try:
        assert server.wait(900) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert procs["intruder"].wait(300) == 3  # refused: the coordinator never accepted it
        for s in SITES:
            assert procs[s].wait(120) == 0
    finally:
        for p in [server, *procs.values()]:
            if p.poll() is None:
                p.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert "never accepted this site" in (tmp_path / "intruder.log").read_text()
    superlink_log = (out / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log  # the refusal is named
    # The coordinator's log never carries key material.
    pub = keys["intruder"][1].read_text().split()[1]
    for log in [tmp_path / "server.log", out / "superlink.log"]:
        assert pub not in log.read_text()
