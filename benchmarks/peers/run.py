"""fedmed against its peers on one job: wall time, peak memory, bytes per round, final AUC.

The job (``--job``) is fedmed's federation benchmark (:func:`benchmarks.federation.run`,
``synth``): the synthetic cohort of three hospitals plus the coordinator's central set, 4 rounds
× 3 local epochs of the fusion model; or real data (``heart``): UCI heart disease's four
hospitals with a pooled held-out quarter as the central set
(:func:`benchmarks.common.heart_cohort`), 20 rounds × 5 local epochs of the record model
(configs/heart_disease.yaml). Both: seed 0, FedAvg weighted by training examples, cosine
learning rate over rounds. Each runs as

* ``fedmed demo`` — the real deployment (SuperLink + one SuperNode per site, loopback);
* ``fedmed simulate`` — fedmed on Flower's simulation engine;
* ``flwr run`` of ``benchmarks/peers/flower_app`` — a plain Flower app (quickstart-pytorch's
  shape) on the simulation engine, with its local SuperLink started by ``flwr run``;
* ``benchmarks/peers/nvflare_app/job.py`` — NVIDIA FLARE 2.9's FedAvg recipe with its PyTorch
  Client API in FLARE's simulator;
* opt-in, ``--only flower_deployment ...``: the same Flower app under Flower's own deployment
  runtime (``benchmarks/peers/flower_deployment.py``: a SuperLink and one SuperNode per site on
  loopback, Flower's default isolation), the like-for-like peer of ``fedmed demo``.

The peers run from the separate venv ``.venv-peers`` (``make bench-peers-setup``) and use
fedmed's model, data and loss, so all four do the same computation (their final AUCs say
whether they did). Each run is a fresh process tree, one at a time, in rotating order over
``repeats``: wall = launch to exit (start-up included); memory = peak of the summed resident
memory of every process of the run (sampled every 0.25 s); bytes = what each site's reply
to a training round carries, as each framework serialises it.

Run: ``python -m benchmarks.peers.run [--job heart] [--repeats 2] [--out runs/peers]`` (fedmed's venv).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, cohort, cohort_sites, heart_cohort
from fedmed.experiments.simulate import rss_mb

__all__ = ["EXTRA_RUNS", "PEER_VENV", "RUNS", "main", "measure"]

PEER_VENV = ROOT / ".venv-peers"
HERE = Path(__file__).resolve().parent
RUNS = ("fedmed_deployment", "fedmed_simulation", "flower", "nvflare",
        "fedmed_deployment_same_work", "fedmed_simulation_same_work")
# Opt-in (--only): the Flower app under Flower's own deployment runtime, the like-for-like
# peer of fedmed's deployment. Each message starts a fresh ClientApp process there (~10 min
# for the real-data job's 80 trainings on this 2-core machine), so it is not in every run.
EXTRA_RUNS = ("flower_deployment",)
# fedmed's defaults do more than the peers: the sites score their test splits in the last round
# and the best model is temperature-scaled on the sites' val splits. The *_same_work arms turn
# both off, so the peers' work (train, score the central set) is compared with fedmed doing only that.
SAME_WORK = ["federation.fraction_evaluate=0", "federation.calibration=off"]
JOBS: dict[str, dict[str, Any]] = {
    "synth": {"rounds": 4, "local_epochs": 3, "image_size": 64, "config": "configs/default.yaml"},
    # 100 local epochs in all, as simulations/heart_disease.sh gives every method
    "heart": {"rounds": 20, "local_epochs": 5, "image_size": 64, "config": "configs/heart_disease.yaml"},
}
JOB: dict[str, Any] = {"name": "synth", **JOBS["synth"]}  # main() sets the chosen job
# Every framework trains all the cohort's sites at once: Ray is given one logical CPU per site
# (its default is the machine's 2 cores, which would run two of three sites and then the
# third), FLARE one thread per client.


@contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (the same lock the shell's ``flock`` takes)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux ``/proc``)."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            out[int(d.name)] = (ppid, cmd)
    return out


def _tree(root: int, procs: dict[int, tuple[int, str]], marker: str | None) -> set[int]:
    """``root`` and its descendants, plus processes (and theirs) whose command line has
    ``marker`` (a detached daemon such as the SuperLink ``flwr run`` starts)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = [root] + ([p for p, (_, c) in procs.items() if marker in c] if marker else [])
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += children.get(p, [])
    return seen


def _timed(cmd: list[str], *, log: Path, env: dict[str, str], marker: str | None = None,
           timeout: float = 1200) -> dict[str, float]:
    """Run ``cmd`` to exit; wall seconds and the peak summed RSS (MiB) of its process tree."""
    peak, stop = [0.0], threading.Event()
    with open(log, "w") as fh:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(_tree(proc.pid, _procs(), marker)))
                stop.wait(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            code = proc.wait(timeout=timeout)
        finally:
            wall = time.time() - t0
            stop.set()
            th.join()
    if code != 0:
        raise RuntimeError(f"{cmd[0]} exited {code}; see {log}")
    return {"wall_s": wall, "peak_rss_mb": peak[0], "t0": t0}


def _kill_marked(marker: str) -> None:
    """End the daemons this run left behind (found by ``marker``, ended by pid)."""
    for pid, (_, cmd) in _procs().items():
        if marker in cmd and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


def _env() -> dict[str, str]:
    # One torch thread per process for every framework: three sites share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _fedmed_job(root: Path) -> list[str]:
    # min_sites = every site: round 1 waits for all of them, as the peers' rounds always train all
    # three (with the default 2, a site that registered late missed round 1: another computation)
    return [f"data.root={root}", "data.notes_column=null", f"federation.central_test={root / 'central'}",
            f"federation.min_sites={len(cohort_sites(root))}",
            "train.progress=false", f"federation.rounds={JOB['rounds']}",
            f"federation.local_epochs={JOB['local_epochs']}", f"federation.evaluate_every={JOB['rounds']}",
            f"data.image_size={JOB['image_size']}"]


def _fedmed(kind: str, root: Path, out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    bin_ = Path(sys.executable).parent / "fedmed"
    cfg = str(ROOT / JOB["config"])
    job = [*_fedmed_job(root), *(extra or [])]
    if kind == "deployment":
        cmd = [str(bin_), "demo", "-c", cfg, "--out", str(out), *job]
    else:
        # one Ray CPU per site and as many as there are sites: all three train side by side, as in
        # the deployment, FLARE's simulator (one thread per client) and the Flower app below
        cmd = [str(bin_), "simulate", "-c", cfg, "--out", str(out), "--cpus-per-site", "1",
               "--cpus", str(len(cohort_sites(root))), *job]
    if kind == "deployment":
        with _lock("/tmp/fedmed-deploy.lock"):
            t = _timed(cmd, log=out.parent / f"{out.name}.log", env=_env())
    else:
        t = _timed(cmd, log=out.parent / f"{out.name}.log", env=_env())
    from fedmed.server.checkpoint import load_state

    bytes_ = [int(e["bytes"]) for audit in sorted(out.glob("sites/*/audit.jsonl"))  # the sites' guard logs
              for e in map(json.loads, audit.read_text().splitlines()) if e.get("type") == "train" and "bytes" in e]
    return {**t, "central_test_auc": load_state(out).history[-1].get("central_test_auc"), "bytes_per_reply": bytes_,
            "to_results_s": (out / "summary.json").stat().st_mtime - t["t0"]}


def _flower_app_args(root: Path, result: Path) -> tuple[str, dict[str, str]]:
    """The Flower app's ``--run-config`` for this job and the environment its runs get."""
    run_config = (f"num-server-rounds={JOB['rounds']} local-epochs={JOB['local_epochs']} "
                  f"image-size={JOB['image_size']} cohort='{root}' "
                  f"fedmed-config='{ROOT / JOB['config']}' result='{result}'")
    env = {**_env(), "PATH": f"{PEER_VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
           # the peer venv already holds every dependency, as fedmed's and FLARE's do: no `uv sync`
           # into a fresh runtime environment on every run (Flower 1.42's default)
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return run_config, env


def _flower_result(t: dict[str, Any], result: Path) -> dict[str, Any]:
    r = json.loads(result.read_text())
    return {**t, "central_test_auc": r["central_test_auc"], "bytes_per_reply": r["payload_bytes"],
            "central_auc_by_round": r["central_auc_by_round"], "to_results_s": r["finished"] - t["t0"]}


def _flower(root: Path, out: Path) -> dict[str, Any]:
    home = out / "flwr-home"
    home.mkdir(parents=True)
    result, n = out / "result.json", len(cohort_sites(root))
    run_config, env = _flower_app_args(root, result)
    cmd = [str(PEER_VENV / "bin" / "flwr"), "run", str(HERE / "flower_app"), "--stream",
           "--federation-config",
           f"num_supernodes={n} client_resources_num_cpus=1 init_args_num_cpus={n}",
           "--run-config", run_config]
    try:
        t = _timed(cmd, log=out / "flwr-run.log", env={**env, "FLWR_HOME": str(home)}, marker=str(home))
    finally:
        _kill_marked(str(home))
    return _flower_result(t, result)


def _flower_deployment(root: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    result, n = out / "result.json", len(cohort_sites(root))
    run_config, env = _flower_app_args(root, result)
    cmd = [str(PEER_VENV / "bin" / "python"), str(HERE / "flower_deployment.py"), "--app", str(HERE / "flower_app"),
           "--sites", str(n), "--run-config", run_config, "--out", str(out)]
    return _flower_result(_timed(cmd, log=out / "driver.log", env=env), result)


def _nvflare(root: Path, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    cmd = [str(PEER_VENV / "bin" / "python"), str(HERE / "nvflare_app" / "job.py"),
           "--fedmed_config", str(ROOT / JOB["config"]), "--cohort", str(root), "--out", str(out),
           "--rounds", str(JOB["rounds"]), "--local_epochs", str(JOB["local_epochs"]),
           "--image_size", str(JOB["image_size"])]
    t = _timed(cmd, log=out / "job.log", env=_env())
    r = json.loads((out / "result.json").read_text())
    return {**t, "central_test_auc": r["central_test_auc"], "bytes_per_reply": r["payload_bytes"],
            "to_results_s": r["finished"] - t["t0"]}


def rounds_s(name: str, out: Path) -> float | None:
    """Seconds the run spent in its federated rounds, by the framework's own record: fedmed's
    round timings, Flower's "Strategy execution finished in" (with its initial central
    evaluation), FLARE's log from "Round 0 started" to "Finished FedAvg". The rest of the
    wall is start-up and what follows the last round."""
    import re
    from datetime import datetime

    if name.startswith("fedmed"):
        from fedmed.server.checkpoint import load_state

        return sum(float(r["seconds"]) for r in load_state(out).history)
    if name in ("flower", "flower_deployment"):
        m = re.search(r"Strategy execution finished in ([0-9.]+)s", (out / "flwr-run.log").read_text())
        return float(m.group(1)) if m else None
    stamps, start, end = [], None, None
    for line in (out / "job.log").read_text().splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", line)
        if m:
            stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"))
        elif "Round 0 started" in line and stamps:
            start = stamps[-1]
        elif "Finished FedAvg" in line and stamps:
            end = stamps[-1]
    return (end - start).total_seconds() if start and end else None


def _one(name: str, root: Path, out: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = round(os.getloadavg()[0], 2)
    if name.startswith("fedmed_"):
        kind = name.split("_")[1]
        r = _fedmed(kind, root, out, SAME_WORK if name.endswith("_same_work") else None)
    elif name == "flower":
        r = _flower(root, out)
    elif name == "flower_deployment":
        r = _flower_deployment(root, out)
    else:
        r = _nvflare(root, out)
    return {**r, "rounds_s": rounds_s(name, out), "load_before": load}


def measure(work: Path, *, repeats: int = 1, runs: tuple[str, ...] = RUNS) -> dict[str, Any]:
    """Every run in ``runs`` ``repeats`` times (rotating order) under the benchmark lock."""
    if any(not r.startswith("fedmed_") for r in runs) and not (PEER_VENV / "bin" / "flwr").exists():
        raise FileNotFoundError(f"{PEER_VENV} is missing: run `make bench-peers-setup` first")
    root = heart_cohort(work / "heart") if JOB["name"] == "heart" else cohort(work / "cohort")
    from benchmarks.common import bench_config
    from fedmed.task import load_site_bundle

    cfg = bench_config(root, [f"data.image_size={JOB['image_size']}"], config=ROOT / JOB["config"])
    for site in [*cfg.data.sites, "central"]:  # every run starts with the decoded-image cache filled
        load_site_bundle(cfg, site_dir=root / site, progress=False)
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in runs}
    with _lock("/tmp/fedmed-bench.lock"):
        for rep in range(repeats):
            order = list(runs[rep % len(runs):]) + list(runs[:rep % len(runs)])
            for name in order:
                print(f"[peers] repeat {rep + 1}/{repeats}: {name} ...", flush=True)
                rows[name].append(_one(name, root, work / f"{name}-{rep}"))
                r = rows[name][-1]
                print(f"[peers]   {r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MiB, "
                      f"AUC {r['central_test_auc']:.4f} (load {r['load_before']})", flush=True)
    summary = {}
    for name, rs in rows.items():
        walls = [r["wall_s"] for r in rs]
        sent = [b for r in rs for b in r["bytes_per_reply"]]  # none in fedmed's simulation: no guard log
        summary[name] = {"wall_s": statistics.median(walls), "wall_all": walls,
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                         "rounds_all": [r.get("rounds_s") for r in rs],
                         "bytes_per_reply": statistics.median(sent) if sent else None,
                         "central_test_auc": [r["central_test_auc"] for r in rs],
                         "load_before": [r["load_before"] for r in rs]}
    from fedmed.task import model_from_config

    model_bytes = sum(t.numel() * t.element_size() for t in model_from_config(cfg).state_dict().values())
    return {"job": JOB, "sites": list(cfg.data.sites), "repeats": repeats, "rows": rows, "summary": summary,
            "model_bytes": model_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="default: runs/peers (synth), runs/peers-heart (heart)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", nargs="*", choices=RUNS + EXTRA_RUNS, default=list(RUNS))
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--job", choices=sorted(JOBS), default="synth",
                   help="synth: the synthetic cohort (fusion model); heart: UCI heart disease, 4 real hospitals")
    p.add_argument("--rounds", type=int, help="a shorter job for a smoke run (no doc)")
    p.add_argument("--local-epochs", type=int)
    a = p.parse_args(argv)
    job = JOBS[a.job]
    rounds, local_epochs = a.rounds or job["rounds"], a.local_epochs or job["local_epochs"]
    smoke = (rounds, local_epochs) != (job["rounds"], job["local_epochs"])
    JOB.clear()
    JOB.update(job, name=a.job, rounds=rounds, local_epochs=local_epochs)
    a.out = a.out or ROOT / "runs" / ("peers" if a.job == "synth" else f"peers-{a.job}")
    a.out.mkdir(parents=True, exist_ok=True)
    res = measure(a.out.resolve(), repeats=a.repeats, runs=tuple(a.only))
    (a.out / "peers.json").write_text(json.dumps(res, indent=2, default=float))
    from benchmarks.peers.report import update_doc

    if not smoke:
        update_doc(a.doc, peers=res)
    print(f"[peers] results in {a.out / 'peers.json'}" + ("" if smoke else f"; section updated in {a.doc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
