"""The plain Flower app under Flower's own deployment runtime on loopback, as one process tree.

``python benchmarks/peers/flower_deployment.py --app DIR --sites N --run-config "..." --out DIR``
(with ``.venv-peers``' python; :mod:`benchmarks.peers.run` starts it). It starts a
``flower-superlink`` and one ``flower-supernode`` per site (``partition-id`` i of N), each with
Flower's default isolation (every message runs in a fresh ``flwr-clientapp`` process), submits
the app with ``flwr run --stream``, and stops them all once the run has ended. Stock Flower
throughout: what a user deploying the plain app would run, with the peers' venv holding its
dependencies (no installation at run time, as for fedmed and FLARE). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    """End each started process and its children (its own session: its group)."""
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except OSError:
            pass
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--app", type=Path, required=True, help="the Flower app's folder")
    p.add_argument("--sites", type=int, required=True, help="SuperNodes to start, one per site")
    p.add_argument("--run-config", required=True, help="flwr run --run-config")
    p.add_argument("--out", type=Path, required=True, help="logs and FLWR_HOME go here")
    a = p.parse_args(argv)
    bin_ = Path(sys.executable).parent
    home = a.out / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home.resolve())}
    port = _free_port()
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        with open(a.out / log, "wb") as fh:
            procs.append(subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))

    try:
        start([str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"], "superlink.log")
        _healthy(port)
        for i in range(a.sites):
            start([str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions={a.sites}"],
                  f"supernode-{i}.log")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        with open(a.out / "flwr-run.log", "wb") as fh:
            return subprocess.call([str(bin_ / "flwr"), "run", str(a.app), "local", "--stream",
                                    "--run-config", a.run_config], env=env, stdout=fh, stderr=subprocess.STDOUT)
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
