"""``fedmed simulate``: N virtual sites on one machine, with the deployment's own apps.

The ServerApp's :func:`fedmed.server.app.run` (the same round driver, tracking and report as
``fedmed-server``) and the site's ClientApp (:mod:`fedmed.client.app`) run under Flower's
simulation engine (``flwr.simulation.run_simulation``, Ray backend). Flower leaves
``run_config`` empty there, so the server's settings travel in a closure and each virtual
site finds its folder through ``FEDMED_SIM_SITES`` / ``FEDMED_SIM_DATA_ROOT`` (read by
:func:`fedmed.client.site.resolve_site`; Ray's workers inherit the environment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.config import FedmedConfig
from fedmed.errors import RunError, UsageError
from fedmed.server.checkpoint import FederationState
from fedmed.stats import StatsRequest

__all__ = ["simulate", "simulate_stats", "federation_sites", "prepare_sites", "tree_rss_mb", "rss_mb"]

log = logging.getLogger("fedmed.simulate")


def federation_sites(cfg: FedmedConfig, sites: list[str] | None = None) -> dict[str, Path]:
    """The site folders that take part: ``sites``, else ``data.sites``, else every folder
    under ``data.root`` except the coordinator's ``federation.central_test``."""
    from fedmed.task import site_dirs

    found = site_dirs(cfg.data.model_copy(update={"sites": None}))
    central = Path(cfg.federation.central_test).resolve() if cfg.federation.central_test else None
    chosen = sites or cfg.data.sites or [s for s, p in found.items() if p.resolve() != central]
    missing = [s for s in chosen if s not in found]
    if missing:
        raise UsageError(f"sites {missing} not found under {cfg.data.root}; found: {sorted(found)}")
    return {s: found[s] for s in chosen}


def prepare_sites(
    cfg: FedmedConfig,
    *,
    sites: list[str] | None = None,
    partition: str | None = None,
    num_sites: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
    out_dir: Path,
) -> tuple[FedmedConfig, str]:
    """Apply a partitioner and return (config pointing at the sites, the per-site table).

    ``natural`` (or no partitioner) keeps the site folders as they are; the others pool the
    chosen sites and write new site folders under ``<out_dir>/partitions``.
    """
    from fedmed.data.site import combine_sites, load_site
    from fedmed.experiments.partition import (
        get_partitioner,
        image_roots_of,
        partition_table,
        write_partitions,
    )

    dirs = federation_sites(cfg, sites)
    loaded = [load_site(p, cfg.data, name=s) for s, p in dirs.items()]
    pooled = combine_sites(loaded) if len(loaded) > 1 else loaded[0]
    name = (partition or "natural").lower()
    fn = get_partitioner(name)
    if name == "natural":
        table = partition_table(pooled.samples, fn(pooled.samples), classes=cfg.data.classes)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"sites": list(dirs)})}), table
    if not num_sites:
        raise UsageError(f"--partition {name} needs --num-sites N")
    kwargs: dict[str, Any] = {"num_sites": num_sites, "seed": seed}
    if alpha is not None:
        kwargs["alpha"] = alpha
    parts = fn(pooled.samples, **kwargs)
    root = out_dir / "partitions"
    write_partitions(pooled, parts, root, classes=cfg.data.classes,
                     meta={"partitioner": name, "num_sites": num_sites, "alpha": alpha, "seed": seed,
                           "source": {s: str(p) for s, p in dirs.items()}})
    table = partition_table(pooled.samples, parts, classes=cfg.data.classes)
    # The partitions point at the original image files: allow exactly their folders.
    roots = sorted({*cfg.data.image_roots, *image_roots_of(pooled)})
    data = cfg.data.model_copy(update={"root": str(root.resolve()), "sites": list(parts), "image_roots": roots})
    return cfg.model_copy(update={"data": data}), table


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _secagg_keys(names: list[str]) -> Iterator[dict[str, str]]:
    """Throw-away signing keys of the simulated sites (secure aggregation verifies them)."""
    if not names:
        yield {}
        return
    import tempfile

    from fedmed.certs import create_site_key

    with tempfile.TemporaryDirectory(prefix="fedmed-secagg-") as tmp:
        for name in names:
            create_site_key(Path(tmp), site=name)
        yield {"FEDMED_SIM_SECAGG_KEYS": tmp}


def tree_rss_mb(pid: int | None = None) -> float:
    """Resident memory (MiB) of a process and all its descendants (Linux ``/proc``; else 0)."""
    pid = pid or os.getpid()
    proc = Path("/proc")
    if not proc.is_dir():
        return 0.0
    children: dict[int, list[int]] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return rss_mb(tree)


def rss_mb(pids: Iterable[int]) -> float:
    """Summed resident memory (MiB) of these processes (Linux ``/proc``; gone ones count 0)."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


class _PeakMemory:
    """Samples :func:`tree_rss_mb` every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.peak = every, 0.0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb())
            self._stop.wait(self.every)

    def __enter__(self) -> _PeakMemory:
        self._th.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._th.join()


def simulate(
    cfg: FedmedConfig,
    *,
    sites: list[str] | None,
    out_dir: Path,
    num_cpus_per_site: int = 1,
    num_gpus_per_site: float | None = None,
    total_cpus: int | None = None,
    mlflow_uri: str | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> FederationState:
    """Run ``cfg``'s federation over the named site folders in Flower's simulation engine.

    Writes what ``fedmed-server`` writes (``config.json``, checkpoints, ``summary.json``,
    ``report.html``, MLflow) plus ``timing.json`` (engine start-up, per-round seconds, peak
    memory of this process tree). ``resume`` continues a stopped federation in ``out_dir`` from
    its last checkpointed round (same config, else the server refuses). GPUs: with CUDA present
    each site gets ``1/N`` of one by default. Raises ValueError when ``federation.min_sites``
    exceeds the number of sites.
    """
    import torch
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmed.client.app import app as client_app
    from fedmed.server.app import run as run_server
    from fedmed.server.checkpoint import load_state

    dirs = federation_sites(cfg, sites)
    names = list(dirs)
    roots = {p.resolve().parent for p in dirs.values()}
    if len(roots) != 1:
        raise UsageError(f"simulated sites must share one data folder, got {sorted(map(str, roots))}")
    n = len(names)
    if cfg.federation.min_sites > n:
        raise UsageError(f"federation.min_sites={cfg.federation.min_sites} but only {n} sites are "
                         f"simulated ({', '.join(names)}); pass federation.min_sites={n}")
    if num_gpus_per_site is None:
        num_gpus_per_site = 1.0 / n if torch.cuda.is_available() else 0.0
    total_cpus = total_cpus or os.cpu_count() or 1
    if num_cpus_per_site > total_cpus:
        raise UsageError(f"num_cpus_per_site={num_cpus_per_site} exceeds the {total_cpus} CPUs given to Ray")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sites": names})})
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    run_config = {"fedmed-config": str(out_dir / "config.json"), "out-dir": str(out_dir),
                  "resume": bool(resume), "mlflow-uri": mlflow_uri or ""}
    marks: dict[str, float] = {}

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        marks["server_start"] = time.perf_counter()
        run_server(grid, run_config)

    # Each simulated site keeps its state (the DP ledger) in this run's folder: a re-run is a
    # new federation with its own budget, not the spent budget of an earlier run.
    # Simulated sites are the user's own data, so they run with an open policy (a real
    # site's policy is its own YAML, enforced by fedmed-client) and the config's image roots.
    site_extra = {"image_roots": list(cfg.data.image_roots), "num_workers": cfg.data.num_workers,
                  "id_column": cfg.data.id_column,
                  "policy": {"allow_notes": True, "min_batch_size": 1, "max_local_steps": None}}
    env = {"FEDMED_SIM_SITES": ",".join(names), "FEDMED_SIM_DATA_ROOT": str(roots.pop()),
           "FEDMED_SIM_STATE_DIR": str(out_dir / "sites"), "FEDMED_SIM_SITE_CONFIG": json.dumps(site_extra),
           "OMP_NUM_THREADS": str(num_cpus_per_site), "MKL_NUM_THREADS": str(num_cpus_per_site),
           "RAY_DEDUP_LOGS": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    backend: dict[str, dict[str, Any]] = {
        "client_resources": {"num_cpus": num_cpus_per_site, "num_gpus": float(num_gpus_per_site)},
        "init_args": {"num_cpus": total_cpus, "include_dashboard": False}}
    log.info("simulating %d sites (%s), %d CPU(s) and %.2f GPU(s) each", n, ", ".join(names),
             num_cpus_per_site, num_gpus_per_site)
    t0 = time.perf_counter()
    with _secagg_keys(names if cfg.federation.secure_aggregation else []) as keys, \
            _environ({**env, **keys}), _PeakMemory() as mem:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                       backend_config=backend, verbose_logging=verbose)
    total = time.perf_counter() - t0
    if not (out_dir / "summary.json").exists():
        raise RunError(f"the simulated federation did not complete; see the log above and {out_dir}")
    state = load_state(out_dir)
    rounds = [float(r.get("seconds", 0.0)) for r in state.history]
    # Ray and its actors start inside round 1 (the first message): start-up is round 1's
    # excess over a steady round, plus what ran before the ServerApp's first line.
    steady = float(np.median(rounds[1:])) if len(rounds) > 1 else 0.0
    before = marks.get("server_start", t0) - t0
    timing = {"sites": n, "rounds": len(rounds), "total_s": round(total, 2),
              "startup_s": round(before + max(rounds[0] - steady, 0.0), 2) if rounds else None,
              "first_round_s": round(rounds[0], 2) if rounds else None,
              "steady_round_s": round(steady, 2),
              "round_s": [round(s, 2) for s in rounds],
              "peak_rss_mb": round(mem.peak, 1), "num_cpus_per_site": num_cpus_per_site,
              "num_gpus_per_site": num_gpus_per_site, "ray_cpus": total_cpus}
    (out_dir / "timing.json").write_text(json.dumps(timing, indent=2))
    return state


def simulate_stats(cfg: FedmedConfig, req: StatsRequest, *, out_dir: Path,
                   sites: list[str] | None = None, total_cpus: int | None = None) -> dict[str, Any]:
    """Federated statistics over ``cfg``'s site folders in Flower's simulation engine.

    The same ClientApp handler and guard as a deployment; sites get the simulation's open
    policy except the statistics floor, which stays the default (k = 5).
    """
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmed.client.app import app as client_app
    from fedmed.server.stats import STATS_REQUEST, run_stats

    dirs = federation_sites(cfg, sites)
    names = list(dirs)
    roots = {p.resolve().parent for p in dirs.values()}
    if len(roots) != 1:
        raise UsageError(f"simulated sites must share one data folder, got {sorted(map(str, roots))}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg.federation.model_copy(update={"min_sites": len(names)})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sites": names}), "federation": fed})
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    (out_dir / STATS_REQUEST).write_text(json.dumps(req.__dict__))
    run_config = {"fedmed-config": str(out_dir / "config.json"), "out-dir": str(out_dir), "fedmed-task": "stats"}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        run_stats(grid, run_config)

    site_extra = {"image_roots": list(cfg.data.image_roots), "id_column": cfg.data.id_column,
                  "policy": {"allow_notes": True, "min_batch_size": 1, "max_local_steps": None}}
    env = {"FEDMED_SIM_SITES": ",".join(names), "FEDMED_SIM_DATA_ROOT": str(roots.pop()),
           "FEDMED_SIM_STATE_DIR": str(out_dir / "sites"), "FEDMED_SIM_SITE_CONFIG": json.dumps(site_extra),
           "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    backend: dict[str, dict[str, Any]] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": total_cpus or os.cpu_count() or 1, "include_dashboard": False}}
    with _environ(env):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(names),
                       backend_config=backend)
    if not (out_dir / "stats.json").exists():
        raise RunError(f"the statistics run did not complete; see the log above and {out_dir}")
    return json.loads((out_dir / "stats.json").read_text())
