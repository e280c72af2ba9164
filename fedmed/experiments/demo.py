"""``fedmed demo``: a complete federation on one machine, with the real deployment engine.

It writes the synthetic cohort (if absent), starts ``fedmed-server`` and one
``fedmed-client`` per site as separate processes on loopback — exactly the commands a
hospital deployment uses — and waits for the federation to finish.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["demo"]


def demo(*, config: Path, rounds: int | None, out: Path | None, overrides: list[str]) -> int:
    """Run the demo federation; returns the server's exit code."""
    from fedmed.config import load_config
    from fedmed.flower import free_port

    cfg = load_config(config, overrides)
    root = Path(cfg.data.root or "data/synth")
    sites = cfg.data.sites or []
    if not (root / "fedmed-data.yaml").exists():
        # only here: pandas and pydicom cost ~1 CPU-s, taken from the sites' start-up on every run
        from fedmed.data.importers.synth import synthesize

        print(f"fedmed demo: writing the synthetic cohort to {root}", flush=True)
        synthesize(root, sites=max(len(sites), 3), central=300)
    sites = sites or sorted(p.name for p in root.iterdir() if (p / "records.csv").exists() and p.name != "central")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (out or Path(cfg.output_dir) / f"{cfg.name}-demo-{stamp}").resolve()
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    # Several sites share this machine's cores: one thread each avoids oversubscription.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (len(sites) + 1))))
    server_cmd = [str(bin_dir / "fedmed-server"), "-c", str(config), "--insecure", "--host", "127.0.0.1",
                  "--port", str(port), "--out", str(out), *overrides]
    if rounds:
        server_cmd += ["--rounds", str(rounds)]
    print(f"fedmed demo: coordinator + {len(sites)} sites on 127.0.0.1:{port}; run folder {out}", flush=True)
    print("  $ " + " ".join(server_cmd[0:1] + ["-c", str(config), "--insecure", "--port", str(port)]), flush=True)
    server = subprocess.Popen(server_cmd, env=env)
    clients: list[subprocess.Popen[Any]] = []
    logs = out / "sites"
    logs.mkdir(parents=True, exist_ok=True)
    for site in sites:
        cmd = [str(bin_dir / "fedmed-client"), "--site", site, "--data-dir", str(root / site),
               "--server", f"127.0.0.1:{port}", "--insecure", "--once", "--grace", "5",
               "--work-dir", str(logs / site)]
        print("  $ " + " ".join(["fedmed-client", "--site", site, "--data-dir", str(root / site),
                                 "--server", f"127.0.0.1:{port}", "--insecure"]), flush=True)
        clients.append(subprocess.Popen(cmd, env=env, stdout=open(logs / f"{site}.log", "w"),
                                        stderr=subprocess.STDOUT))
    try:
        code = server.wait()
        if code == 0:  # the federation is over: the sites need not wait out their grace period
            for c in clients:
                c.terminate()
        for c in clients:
            try:
                c.wait(60)
            except subprocess.TimeoutExpired:
                c.terminate()
    except KeyboardInterrupt:
        server.terminate()
        for c in clients:
            c.terminate()
        return 130
    if code == 0:
        print(f"\nfedmed demo: done. Open {out / 'report.html'} (curves, per-site table, confusion matrix);"
              f"\n  MLflow: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}", flush=True)
    return code
