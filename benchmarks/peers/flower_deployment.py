"""The plain Flower app under Flower's own deployment runtime on loopback, as one process tree.

``python benchmarks/peers/flower_deployment.py --app DIR --sites N --run-config "..." --out DIR``
(with ``.venv-peers``' python; :mod:`benchmarks.peers.run` starts it). It starts a
``flower-superlink`` and one ``flower-supernode`` per site (``partition-id`` i of N), each with
Flower's default isolation (every message runs in a fresh ``flwr-clientapp`` process), submits
the app with ``flwr run --stream``, and stops them all once the run has ended. Stock Flower
throughout: what a user deploying the plain app would run, with the peers' venv holding its
dependencies (no installation at run time, as for fedmed and FLARE). Starting and stopping the
processes, ports, the health wait and the flwr CLI's connection file are fedmed's own helpers
(:mod:`fedmed.flower`; fedmed is in the peers' venv for its model and data).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fedmed.flower import console_script, free_port, spawn, stop, wait_healthy, write_connection


def _stop(procs: list[subprocess.Popen]) -> None:
    """End each started process and its children (its own session: its group), last first."""
    for p in reversed(procs):
        stop(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--app", type=Path, required=True, help="the Flower app's folder")
    p.add_argument("--sites", type=int, required=True, help="SuperNodes to start, one per site")
    p.add_argument("--run-config", required=True, help="flwr run --run-config")
    p.add_argument("--out", type=Path, required=True, help="logs and FLWR_HOME go here")
    a = p.parse_args(argv)
    home = a.out / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home.resolve())}
    address = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                            address.rsplit(":", 1)[1], "--disable-runtime-dependency-installation"],
                           env=env, log_path=a.out / "superlink.log"))
        wait_healthy(address, proc=procs[0], log_path=a.out / "superlink.log")
        for i in range(a.sites):
            procs.append(spawn(["flower-supernode", "--insecure", "--superlink", address, "--port",
                                str(free_port()), "--node-config", f"partition-id={i} num-partitions={a.sites}"],
                               env=env, log_path=a.out / f"supernode-{i}.log"))
        write_connection(home, name="local", address=address)
        with open(a.out / "flwr-run.log", "wb") as fh:
            return subprocess.call([console_script("flwr"), "run", str(a.app), "local", "--stream",
                                    "--run-config", a.run_config], env=env, stdout=fh, stderr=subprocess.STDOUT)
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
