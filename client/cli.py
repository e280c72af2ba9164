"""``fedmed-client``: run one hospital site (a Flower SuperNode) next to its data.

The site's own config names its data folder and its privacy caps; the node retries while
the coordinator is not up yet and trains/evaluates whenever the server asks. Data never
leaves the site: replies carry weights and metrics only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedmed.client.marks import NOTICE_MARK, REFUSAL_MARK, RUNNER_CANNOT, RUNNER_READY
from fedmed.config import SiteConfig, load_site_config
from fedmed.errors import FedmedError, RunError, UsageError, run_command
from fedmed.flower import (
    Tls,
    flower_env,
    free_port,
    interrupt_on_sigterm,
    parse_address,
    server_healthy,
    server_problem,
    spawn,
    stop,
)

__all__ = ["main", "build_parser", "runner_command"]

UNREACHABLE_EVERY = 5.0  # seconds between "cannot reach the coordinator" lines
RUNNER_CHECK_TIMEOUT = 300.0  # seconds the warm runner may take to import and check Flower


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmed-client", description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True, help="this site's name, e.g. hospital_a")
    p.add_argument("--config", "-c", type=Path, help="site YAML (see configs/site_example.yaml)")
    p.add_argument("--data-dir", type=Path, help="site data folder (instead of / overriding the YAML)")
    p.add_argument("--server", default="127.0.0.1:9092", help="coordinator address host:port")
    p.add_argument("--port", type=int, help="this node's local runtime port (default: a free one)")
    p.add_argument("--work-dir", type=Path, help="node state folder (default ~/.fedmed/sites/<site>)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP: only for tests on one machine")
    p.add_argument("--root-certificates", type=Path, help="CA certificate that signed the server's")
    p.add_argument("--auth-key", type=Path, help="this site's private key (its .pub is given to the server)")
    p.add_argument("--once", action="store_true",
                   help="exit after the coordinator shuts down (one federation), instead of serving on")
    p.add_argument("--grace", type=float, default=20.0,
                   help="with --once: seconds the server must stay unreachable before exiting "
                        "(it is probed every grace/2 s, 1 to 5 s)")
    p.add_argument("--poll", type=float, default=float(os.environ.get("FEDMED_NODE_POLL", "0.25")),
                   help="longest wait of the idle node before it asks the coordinator again, seconds "
                        "(default 0.25, or $FEDMED_NODE_POLL; 3 = Flower's own node, unchanged)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="site config overrides")
    return p


def site_config(args: argparse.Namespace) -> SiteConfig:
    """The site's config from its YAML and flags; the site name must match."""
    overrides = list(args.overrides)
    if args.data_dir is not None:
        overrides.append(f"data_dir={args.data_dir.resolve()}")
    if args.config is not None:
        cfg = load_site_config(args.config, overrides)
        if cfg.site != args.site:
            raise UsageError(f"--site {args.site} but {args.config} is the config of site {cfg.site}")
        return cfg
    if args.data_dir is None:
        raise UsageError("give the site's data with --config SITE.yaml or --data-dir DIR")
    from fedmed.config import apply_overrides, parse_overrides

    raw = apply_overrides({"site": args.site}, parse_overrides(overrides))
    return SiteConfig.model_validate(raw)


def run(args: argparse.Namespace) -> int:
    parse_address(args.server)  # a malformed address is refused now, not retried forever
    cfg = site_config(args)
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"site {cfg.site}: data folder {data_dir} does not exist")
    if not args.insecure and args.root_certificates is None:
        raise UsageError("no --root-certificates given: pass the coordinator's CA certificate, "
                         "or --insecure to run without TLS on a trusted network")
    tls = Tls(ca=args.root_certificates.resolve()) if args.root_certificates else None
    work = (args.work_dir or Path.home() / ".fedmed" / "sites" / cfg.site).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if cfg.state_dir is None:  # the privacy ledger lives with the node's state
        cfg = cfg.model_copy(update={"state_dir": str(work)})
    if args.auth_key is not None and cfg.secagg.signing_key is None:  # it also signs secure-aggregation keys
        cfg = cfg.model_copy(update={"secagg": cfg.secagg.model_copy(
            update={"signing_key": str(args.auth_key.resolve())})})
    site_yaml = work / "site.yaml"
    site_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    env = flower_env(work / ".flwr")
    port = args.port or free_port()
    node_args = [*_node_command(args.poll), "--superlink", args.server, "--port", str(port), "--node-config",
                 f"site='{cfg.site}' site-config='{site_yaml}' audit-log='{work / 'audit.jsonl'}'"]
    # Flower's SuperNode installs no app dependencies unless --allow-runtime-dependency-installation.
    if tls is None:
        node_args.append("--insecure")
    else:
        node_args += ["--root-certificates", str(tls.ca)]
    if args.auth_key is not None:
        if not args.auth_key.is_file():
            raise FileNotFoundError(f"site key not found: {args.auth_key}")
        node_args += ["--auth-supernode-private-key", str(args.auth_key.resolve())]
    log_path = work / "supernode.log"
    app_log = work / "clientapp.log"
    for path in (log_path, app_log):
        if path.exists():  # keep the previous session's log beside the new one
            path.replace(path.with_suffix(".log.1"))
    print(f"fedmed-client: site {cfg.site} joining {args.server} "
          f"({'TLS' if tls else 'INSECURE, no TLS'}); data {data_dir}; log {log_path}", flush=True)
    runner_args = runner_command(port, data_dir)
    isolation = "process"

    def start() -> list:
        nonlocal isolation
        runner = None
        if isolation == "process":  # the runner checks this Flower first; the node starts after
            runner = _start_runner(runner_args, env=env, app_log=app_log)
            if runner is None:
                isolation = _fallback_isolation(work, env)
        node = spawn([*node_args, "--isolation", isolation], env=env, log_path=log_path)
        # isolation subprocess: Flower's SuperExec runs the (gated) flwr-clientapp per task
        return [node] if runner is None else [node, runner]

    return _supervise(start, args, tls, log_path)


def runner_command(port: int, data_dir: Path) -> list[str]:
    """The warm runner's command line: a site folder without ``images.csv`` holds no images,
    so its runner does not import torchvision's augmentation ahead of the tasks."""
    cmd = [sys.executable, "-m", "fedmed.client.warm", "--runtime-api-address", f"127.0.0.1:{port}"]
    return cmd if (data_dir / "images.csv").exists() else [*cmd, "--no-images"]


def _start_runner(runner_args: list[str], *, env: dict[str, str], app_log: Path) -> subprocess.Popen | None:
    """The warm runner, once it has found what it needs in this Flower; None when it has not.

    It checks Flower's internals before anything else (:data:`RUNNER_READY`, or exit
    :data:`RUNNER_CANNOT`), and the node starts only after: a site that cannot check apps
    never joins.
    """
    start = app_log.stat().st_size if app_log.exists() else 0
    runner = spawn(runner_args, env=env, log_path=app_log)
    deadline = time.monotonic() + RUNNER_CHECK_TIMEOUT
    while time.monotonic() < deadline:
        with open(app_log, "rb") as fh:
            fh.seek(start)
            if RUNNER_READY.encode() in fh.read():
                return runner
        code = runner.poll()
        if code == RUNNER_CANNOT:
            return None
        if code is not None:
            raise RunError(f"the site's ClientApp runner exited with code {code} while it started (log {app_log})")
        time.sleep(0.05)
    stop(runner)
    raise RunError(f"the site's ClientApp runner did not start in {RUNNER_CHECK_TIMEOUT:.0f}s (log {app_log})")


def _node_command(poll: float) -> list[str]:
    """Flower's SuperNode, its idle sleep capped at ``poll`` s (:mod:`fedmed.client.node`).

    Flower 1.42 sleeps 3 s between asks when idle, with no setting; each round's messages
    then waited 1.5 s on average (docs/benchmarks.md). ``poll >= 3`` runs Flower's node as is,
    and so does :mod:`fedmed.client.node` itself when this Flower has moved that loop.
    """
    if poll >= 3.0:
        return ["flower-supernode"]
    return [sys.executable, "-m", "fedmed.client.node", "--poll", f"{poll:g}", "--"]


def _fallback_isolation(work: Path, env: dict[str, str]) -> str:
    """``subprocess`` (Flower's own per-task ``flwr-clientapp`` behind fedmed's app gate) for a
    Flower that lacks what the warm runner needs; when even the gate cannot be installed the
    site refuses to start: it would run unchecked apps.
    """
    from fedmed.client import flower_compat, gate

    problem = flower_compat.check_warm()
    gate_problem = flower_compat.check_gate()
    if gate_problem is not None:
        raise SiteStartRefused(
            f"this Flower ({flwr_version()}) lacks what fedmed's warm runner needs ({problem}) and fedmed "
            f"cannot check submitted apps in Flower's own ClientApp process ({gate_problem}); refusing to "
            "start rather than run unapproved code. Install the Flower version fedmed pins.")
    gate.install_shim(work / "bin")
    env["PATH"] = os.pathsep.join([str(work / "bin"), env["PATH"]])
    print(f"fedmed-client: WARNING: this Flower ({flwr_version()}) lacks what fedmed's warm runner needs "
          f"({problem}); falling back to Flower's --isolation subprocess (one process per task: slower, "
          "still correct; submitted apps are still checked)", file=sys.stderr, flush=True)
    return "subprocess"


class SiteStartRefused(FedmedError, RuntimeError):
    """The site cannot enforce what it promises and does not start."""


def flwr_version() -> str:
    from importlib.metadata import version

    return f"flwr {version('flwr')}"


def _echo_refusals(paths: list[Path], offsets: dict[Path, int]) -> None:
    """Show on the console every refusal line the runners wrote to the site's logs."""
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.seek(offsets.get(path, 0))
                data = fh.read()
        except FileNotFoundError:
            continue
        end = data.rfind(b"\n") + 1
        offsets[path] = offsets.get(path, 0) + end
        for line in data[:end].decode(errors="replace").splitlines():
            if line.startswith((REFUSAL_MARK, NOTICE_MARK)):
                print(f"fedmed-client: {line}", file=sys.stderr, flush=True)


def _joined(log_path: Path) -> bool:
    """Whether the coordinator accepted this node (Flower logs its SuperNode ID)."""
    return log_path.exists() and "SuperNode ID:" in log_path.read_text(errors="replace")


def _supervise(start, args: argparse.Namespace, tls: Tls | None, log_path: Path) -> int:
    """Keep the node running and restart it when the coordinator refused or dropped it.

    With ``--once`` the site leaves after the coordinator has gone away: exit 0 when it took
    part, 3 when the coordinator never accepted it (e.g. its key was not invited).
    """
    procs = start()
    node = procs[0]
    logs = [log_path, log_path.with_name("clientapp.log")]
    offsets: dict[Path, int] = {}
    # One health probe serves both the "cannot reach" line and --once's departure. Each passes
    # the coordinator's gateway and SuperLink, which share the machine with the sites' training in
    # a demo: probe often enough to leave within the grace period, no more often.
    probe_every = min(max(args.grace / 2, 1.0), UNREACHABLE_EVERY) if args.once else UNREACHABLE_EVERY
    next_probe = time.monotonic() + probe_every
    last_said = time.monotonic()
    seen_server = False
    gone_since: float | None = None
    backoff = 2.0
    try:
        while True:
            code = node.poll()
            if code is None and any(p.poll() is not None for p in procs[1:]):
                code = -1  # the ClientApp runner died: restart the pair
            if code is not None:
                for p in procs:
                    stop(p)
                if args.once and seen_server and not server_healthy(args.server, tls=tls) and _joined(log_path):
                    return 0
                reason = ("refused or unreachable" if code == 305 else "lost its ClientApp runner" if code == -1
                          else f"exited with code {code}")
                print(f"fedmed-client: the node {reason}; retrying in {backoff:.0f}s "
                      f"(log {log_path})", file=sys.stderr, flush=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                procs = start()
                node = procs[0]
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + probe_every
                problem = server_problem(args.server, tls=tls)
                if problem is None:
                    seen_server, gone_since = True, None
                elif time.monotonic() - last_said >= UNREACHABLE_EVERY:
                    last_said = time.monotonic()
                    print(f"fedmed-client: cannot reach the coordinator at {args.server}: {problem}; "
                          "retrying", file=sys.stderr, flush=True)
                if args.once and problem is not None and seen_server:
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since > args.grace:
                        if _joined(log_path):
                            print("fedmed-client: the coordinator has shut down; leaving", flush=True)
                            return 0
                        print("fedmed-client: the coordinator never accepted this site "
                              "(is its public key invited with --auth-key?); leaving", file=sys.stderr)
                        return 3
            _echo_refusals(logs, offsets)
            time.sleep(1.0)
    finally:
        _echo_refusals(logs, offsets)
        for p in procs:
            stop(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt_on_sigterm()
    return run_command("fedmed-client", lambda: run(args), interrupted="stopped", interrupted_code=0)


if __name__ == "__main__":
    sys.exit(main())
