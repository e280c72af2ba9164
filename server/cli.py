"""``fedmed-server``: start the coordinator (Flower SuperLink), run one federation, exit.

It waits for the minimum number of sites, runs the rounds, evaluates, saves checkpoints
and the report, and exits 0 only when the federation completed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from fedmed.certs import create_certificates
from fedmed.config import FedmedConfig, load_config
from fedmed.errors import RunError, UsageError, run_command
from fedmed.flower import (
    Tls,
    flower_env,
    flwr,
    flwr_lines,
    free_port,
    interrupt_on_sigterm,
    spawn,
    spawn_lines,
    stop,
    wait_healthy,
    write_app_dir,
    write_connection,
)
from fedmed.server import leftovers
from fedmed.server.gateway import Gateway
from fedmed.server.warm import RUNNER_UNSUPPORTED

__all__ = ["main", "build_parser"]

CONNECTION = "fedmed"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmed-server", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", default="configs/default.yaml", help="federation YAML config")
    p.add_argument("--rounds", type=int, help="number of rounds (federation.rounds)")
    p.add_argument("--strategy", help="aggregation strategy (federation.strategy)")
    p.add_argument("--min-sites", type=int, help="sites needed per round (federation.min_sites)")
    p.add_argument("--round-timeout", type=float, help="seconds to wait for sites (federation.round_timeout)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the sites dial (default 127.0.0.1: this machine only; e.g. 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=9092, help="the sites' port (Flower's Fleet API, via fedmed's gateway)")
    p.add_argument("--out", help="run folder (default <output_dir>/<name>)")
    p.add_argument("--resume", action="store_true", help="continue a stopped federation from its last round")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<run folder>/mlflow.db)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP: only for tests on one machine")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   help="with --insecure: allow plain HTTP on a non-loopback --host (weights travel unencrypted)")
    p.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (PEM)")
    p.add_argument("--ssl-certfile", type=Path, help="server certificate (PEM)")
    p.add_argument("--ssl-keyfile", type=Path, help="server private key (PEM)")
    p.add_argument("--auth-key", dest="auth_keys", type=Path, action="append", default=[],
                   help="public key (.pub) of an invited site (repeat per site): only they may join")
    p.add_argument("--startup-timeout", type=float, default=90.0)
    p.add_argument("--evaluate", metavar="MODEL", type=Path,
                   help="no training: send this saved model to the sites, collect metrics with CIs "
                        "(its own config is used; --config is ignored; output beside the model by default)")
    p.add_argument("--evaluate-split", choices=["all", "test"], default="test",
                   help="with --evaluate: each site's test split (default) or every row (sites new to the model)")
    p.add_argument("--bootstrap", type=int, default=200, help="with --evaluate: bootstrap replicates per site")
    p.add_argument("--stats", action="store_true", help="federated statistics instead of training "
                   "(fedmed.stats): aggregates only, small cells suppressed at each site")
    p.add_argument("--stats-k", type=int, default=5, help="--stats: smallest count shown (sites may raise it)")
    p.add_argument("--stats-bins", type=int, default=10)
    p.add_argument("--stats-epsilon", type=float, help="--stats: Gaussian noise with this ε (default none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    ov = list(args.overrides)
    for flag, key in (("rounds", "federation.rounds"), ("strategy", "federation.strategy"),
                      ("min_sites", "federation.min_sites"), ("round_timeout", "federation.round_timeout")):
        if getattr(args, flag) is not None:
            ov.append(f"{key}={getattr(args, flag)}")
    return ov


def _tls(args: argparse.Namespace) -> Tls | None:
    given = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if any(given) and not all(given):
        raise UsageError("TLS needs all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    if all(given):
        for p in given:
            if not p.is_file():
                raise FileNotFoundError(f"TLS file not found: {p}")
        return Tls(ca=args.ssl_ca_certfile.resolve(), cert=args.ssl_certfile.resolve(),
                   key=args.ssl_keyfile.resolve())
    if not args.insecure:
        raise UsageError("no TLS certificates given: pass --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile "
                         "(see `fedmed certs`), or --insecure to run without TLS on a trusted network")
    if args.auth_keys:
        raise UsageError("site authentication (--auth-key) needs TLS; Flower refuses it with --insecure")
    if not is_loopback(args.host) and not args.allow_insecure_remote:
        raise UsageError(f"--insecure on {args.host} would send model weights unencrypted to anyone on the "
                         "network: use TLS (see `fedmed certs`), --host 127.0.0.1, or add "
                         "--allow-insecure-remote if this network is trusted")
    if not is_loopback(args.host):
        print(f"fedmed-server: WARNING: plain HTTP on {args.host}: anyone on this network can read the "
              "weights and submit runs", file=sys.stderr, flush=True)
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only reaches this machine."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def run(args: argparse.Namespace) -> int:
    if args.evaluate is not None:  # the model's own config; the flags set only sites and timeouts
        from fedmed.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.evaluate)
        cfg = load_config(overrides=_overrides(args), raw=ckpt.config.model_dump(mode="json"))
        out = (Path(args.out) if args.out else ckpt.path.parent / "federated-evaluation").resolve()
    else:
        cfg = load_config(args.config, _overrides(args))
        out = (Path(args.out) if args.out else Path(cfg.output_dir) / cfg.name).resolve()
    if (args.evaluate is None and not args.stats and out.exists() and (out / "state.pkl").exists()
            and not args.resume):
        raise UsageError(f"{out} already holds a federation; pass --resume to continue it or --out for a new one")
    out.mkdir(parents=True, exist_ok=True)
    tls = _tls(args)
    stopped = leftovers.claim_run_folder(out)
    if stopped:
        print(f"fedmed-server: stopped {len(stopped)} Flower process(es) a killed earlier server left running "
              f"for {out} (pids {', '.join(map(str, stopped))})", flush=True)
    try:
        return _run(args, cfg, out, tls)
    finally:
        leftovers.release_run_folder(out)


def _run(args: argparse.Namespace, cfg: FedmedConfig, out: Path, tls: Tls | None) -> int:
    flwr_home = out / ".flwr"
    env = flower_env(flwr_home)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    app_dir = write_app_dir(out / "flwr-app")

    # The SuperLink (Fleet + Control + Runtime APIs on one port in Flower 1.42) listens on
    # loopback only; the sites reach its Fleet API through fedmed's gateway (server/gateway.py).
    internal = f"127.0.0.1:{free_port()}"
    # --isolation process: no SuperExec inside the SuperLink; fedmed's warm runner (server/warm.py)
    # takes the run's ServerApp task, or Flower's own SuperExec when this Flower lacks what it needs.
    # Its state in memory (Flower's default), not SQLite on disk: the messages and the sites'
    # replies never touch the coordinator's disk, and each request costs the SuperLink less CPU
    # (a 2-round demo: 10.0 against 17.2 CPU-s, docs/benchmarks.md). A resumed federation does not
    # need it: fedmed's own checkpoint (state.pkl) carries the rounds, and sites register anew.
    link_args = ["flower-superlink", "--host", "127.0.0.1", "--port", internal.rsplit(":", 1)[1],
                 "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:",
                 "--isolation", "process"]
    loopback_tls: Tls | None = None
    if tls is None:
        link_args.append("--insecure")
    else:  # a private CA for the loopback hop: the operator's certificate need not name 127.0.0.1
        shutil.rmtree(flwr_home / "loopback-tls", ignore_errors=True)
        made = create_certificates(flwr_home / "loopback-tls", hosts=["127.0.0.1"])
        loopback_tls = Tls(ca=made["ca_cert"], cert=made["cert"], key=made["key"])
        link_args += ["--ssl-ca-certfile", str(made["ca_cert"]), "--ssl-certfile", str(made["cert"]),
                      "--ssl-keyfile", str(made["key"])]
        if args.auth_keys:
            link_args.append("--enable-supernode-auth")
    log_path = out / "superlink.log"
    print(f"fedmed-server: starting the coordinator on {args.host}:{args.port} "
          f"({'TLS' if tls else 'INSECURE, no TLS'}; sites' Fleet API only, run submission on {internal}); "
          f"run folder {out}", flush=True)
    link = spawn(link_args, env=env, log_path=log_path)
    leftovers.record_group(out, link.pid, address=internal)  # own session: group id = its pid
    # Started now so that it imports the ServerApp's code while the SuperLink starts.
    runner = start_runner(internal, ca=loopback_tls.ca if loopback_tls else None, env=env,
                          timeout=args.startup_timeout + 180)
    follower = threading.Thread(target=_follow, args=(runner.stdout, out / "run.log"), daemon=True)
    follower.start()
    gateway: Gateway | None = None
    superexec: subprocess.Popen | None = None
    try:
        wait_healthy(internal, tls=loopback_tls, timeout=args.startup_timeout, proc=link, log_path=log_path)
        gateway = Gateway(args.host, args.port, upstream=f"{'https' if tls else 'http'}://{internal}",
                          upstream_ca=loopback_tls.ca if loopback_tls else None,
                          certfile=tls.cert if tls else None, keyfile=tls.key if tls else None)
        gateway.start()
        write_connection(flwr_home, name=CONNECTION, address=internal, tls=loopback_tls)
        for key in args.auth_keys:
            res = flwr(["supernode", "register", str(Path(key).resolve()), CONNECTION], env=env, timeout=60)
            if res.returncode != 0:
                raise RunError(f"could not register site key {Path(key).name}: {res.stdout[-500:]}")
            print(f"fedmed-server: invited site key {Path(key).name}", flush=True)
        run_cfg = {"fedmed-config": str(out / "config.json"), "out-dir": str(out),
                   "resume": bool(args.resume), "mlflow-uri": args.mlflow_uri or ""}
        if args.evaluate is not None:
            run_cfg.update({"evaluate-model": str(args.evaluate.resolve()), "evaluate-split": args.evaluate_split,
                            "bootstrap": int(args.bootstrap)})
        if args.stats:
            from fedmed.server.stats import STATS_REQUEST, StatsRequest

            req = StatsRequest(k=args.stats_k, bins=args.stats_bins, epsilon=args.stats_epsilon)
            (out / STATS_REQUEST).write_text(json.dumps(req.__dict__))
            run_cfg["fedmed-task"] = "stats"
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_cfg.items())
        res = flwr(["run", str(app_dir), CONNECTION, "-c", overrides, "--format", "json"], env=env, timeout=120)
        if res.returncode != 0:
            raise RunError(f"flwr run failed: {(res.stdout or '')[-1500:]} {(res.stderr or '')[-1500:]}")
        run_id = _run_id(res.stdout)
        print(f"fedmed-server: federation submitted (run {run_id}); waiting for "
              f"{cfg.federation.min_sites} site(s)", flush=True)
        follower.join()
        code = runner.wait()
        if code == RUNNER_UNSUPPORTED:  # Flower's own SuperExec takes the run (a fresh flwr-serverapp)
            superexec = spawn(["flower-superexec", "--runtime-api-address", internal, "--parent-pid", str(os.getpid()),
                               *(["--root-certificates", str(loopback_tls.ca)] if loopback_tls else ["--insecure"])],
                              env=env, log_path=out / "superexec.log")
            log = flwr_lines(["log", str(run_id), CONNECTION], env=env)
            _follow(log.stdout, out / "run.log")
            log.wait()
        # The runner exits with the ServerApp's code: 0 is a completed run; else ask Flower why.
        status, details = ("finished:completed", "") if code == 0 else _run_status(run_id, env)
        if status != "finished:completed":
            print(f"fedmed-server: federation ended ({status}): {_reason(details)} (details: {out / 'run.log'})",
                  file=sys.stderr)
            return 1
        if args.evaluate is not None:
            from fedmed.evaluate import metrics_table

            print("\n" + metrics_table(json.loads((out / "evaluation.json").read_text())), flush=True)
            print(f"\nfedmed-server: evaluation completed; {out / 'evaluation.html'}", flush=True)
            return 0
        if args.stats:
            print(f"\nfedmed-server: statistics {out / 'stats.html'} and {out / 'stats.json'}", flush=True)
            return 0
        # The ServerApp printed the round table above; it is not repeated here.
        print(f"\nfedmed-server: federation completed; report {out / 'report.html'}; "
              f"summary {out / 'summary.json'}", flush=True)
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        stop(runner)
        stop(superexec)
        stop(link)


# Flower's own lines ("INFO :  ..." with colour codes even into a pipe), MLflow's INFO lines
# and the flwr CLI's banners go to the run's log file only; fedmed's lines reach the console.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_ONLY = re.compile(r"^(INFO|DEBUG)\s*:|^ERROR\s*:|^\d{4}/\d\d/\d\d [\d:]+ INFO |^Using SuperLink:|"
                       r"^Successfully installed |^An unhandled exception occurred in the |"
                       r"^For more information, visit: <https://flower")


def start_runner(address: str, *, ca: Path | None, env: dict[str, str], timeout: float) -> subprocess.Popen:
    """Start the warm ServerApp runner (:mod:`fedmed.server.warm`), its output a text pipe."""
    return spawn_lines([sys.executable, "-m", "fedmed.server.warm", "--runtime-api-address", address,
                        "--parent-pid", str(os.getpid()), "--timeout", str(timeout),
                        *(["--root-certificates", str(ca)] if ca else [])], env=env)


def _follow(lines: Iterable[str] | None, log_file: Path) -> None:
    """Stream the run's output: everything to ``log_file``, fedmed's own lines to the console."""
    assert lines is not None
    in_traceback = False
    with open(log_file, "a") as fh:
        for raw in lines:
            fh.write(raw)
            fh.flush()
            line = _ANSI.sub("", raw).rstrip()
            if line.startswith("Traceback "):  # to the log only, up to its exception line
                in_traceback = True
                continue
            if in_traceback:
                in_traceback = line.startswith(" ") or not line
                continue
            if line and not _LOG_ONLY.search(line):
                print(line, flush=True)


def _reason(details: str) -> str:
    """Flower's status details (``<class 'X'>:<'text'>``) as the text alone."""
    text = re.sub(r"^ServerApp failed with exception: ", "", details.strip())
    m = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", text, flags=re.S)
    return m.group(1) if m else text or "no details"


def _run_id(stdout: str) -> int:
    start = stdout.find("{")
    try:
        data = json.loads(stdout[start:])
        return int(data["run-id"])
    except (ValueError, KeyError) as exc:
        raise RunError(f"could not read the run id from flwr run: {stdout[-500:]}") from exc


def _run_status(run_id: int, env: dict[str, str], attempts: int = 20) -> tuple[str, str]:
    """The run's final status from ``flwr ls`` (``flwr log`` exits 0 even on failure)."""
    status, details = "unknown", ""
    for _ in range(attempts):
        res = flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env=env, timeout=60)
        try:
            data = json.loads(res.stdout[res.stdout.find("{"):])
            run = data["runs"][0]
            status, details = str(run.get("status")), str(run.get("status-details", ""))
        except (ValueError, KeyError, IndexError):
            pass
        if status.startswith("finished"):
            break
        time.sleep(1.0)
    return status, details


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt_on_sigterm()
    return run_command("fedmed-server", lambda: run(args), interrupted="interrupted; resume later with --resume")


if __name__ == "__main__":
    sys.exit(main())
