"""Federation overhead (target ≤ 1.15) and network cost (≤ 1.02; fp16 ≤ 0.51 at ≤ 0.005 AUC).

*Direct*: the same local training done without Flower, in one process: each site's data
loaded once, then for every round every site trains ``local_epochs`` from the global
weights with fedmed's own ``train_epochs`` and the updates are averaged (FedAvg), then each
site's test split is evaluated once. *Federation*: the same job through the real
deployment (``fedmed-server`` + one ``fedmed-client`` per site on loopback, the commands a
hospital runs) and through ``fedmed simulate``. Wall time runs from launch until the server
has written its results (summary.json), start-up included.

Network: every reply a site sends is serialised by Flower into objects; the site's guard
(:mod:`fedmed.client.guard`) records their byte count in the audit log, which is compared
with the fp32 size of the model's weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import bench_config, cohort, site_setup

__all__ = ["direct", "deployment", "simulation", "network", "split", "run"]


def direct(cfg, *, threads: int = 1) -> dict[str, Any]:
    """The federation's training work done directly (FedAvg by hand, no framework).

    ``threads``: torch threads, the same as each site's process gets in the deployment
    (``fedmed demo`` gives every site one thread on this machine) so both sides do the
    same work per thread; the sites then run side by side, direct runs them one by one.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _direct(cfg)
    finally:
        torch.set_num_threads(old)


def _direct(cfg) -> dict[str, Any]:
    """The rounds as the deployment computes them, step for step, in one process.

    Everything that decides the numbers is taken from the code the federation runs, not
    re-written: the server's initial model (seed, ``model_from_config``), each round's
    learning rate (:func:`fedmed.server.federation.round_lr`), each site's reseed before it
    trains (the ClientApp's seed formula, torch and the loader's shuffling), the site's
    ``train_epochs`` call, fp32 packing, Flower's own FedAvg aggregation
    (``aggregate_arrayrecords``, replies in site-name order as ``run_federation`` sums
    them), central evaluation. The benchmark asserts both end at the same AUC.
    """
    import zlib

    import torch
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedmed.server.central import make_central_eval
    from fedmed.server.federation import round_lr
    from fedmed.task import model_from_config, seed_everything
    from fedmed.train.loop import evaluate, make_optimizer, train_epochs
    from fedmed.transfer import pack, unpack

    fed = cfg.federation
    if fed.strategy != "fedavg" or fed.bn != "average" or cfg.privacy.enabled or fed.secure_aggregation:
        raise ValueError("the direct baseline reproduces plain FedAvg only (no FedBN, DP or secure aggregation)")
    t0 = time.perf_counter()
    sites = {}
    for name in sorted(cfg.data.sites):  # the order run_federation aggregates in
        bundle, loaders, loss_fn, device = site_setup(cfg, name)
        sites[name] = (bundle, loaders, loss_fn)
    central = make_central_eval(cfg)
    seed_everything(cfg.train.seed)
    model = model_from_config(cfg)
    glob = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}  # not a view: it trains
    model = model.to(device)
    train_s, central_auc, per_round, losses = 0.0, None, [], []
    for rnd in range(1, cfg.federation.rounds + 1):
        replies, slowest = [], 0.0
        losses.append({})
        for name, (_bundle, loaders, loss_fn) in sites.items():
            model.load_state_dict({k: torch.from_numpy(v) for k, v in glob.items()}, strict=True)
            seed = cfg.train.seed + 1000 * rnd + zlib.crc32(name.encode()) % 997  # as client/app.py
            seed_everything(seed)
            if loaders["train"].generator is not None:
                loaders["train"].generator.manual_seed(seed)
            opt = make_optimizer(model, cfg.train, lr=round_lr(cfg, rnd))
            s = train_epochs(model, loaders["train"], loss_fn=loss_fn, optimizer=opt, device=device,
                             epochs=cfg.federation.local_epochs, amp=cfg.train.amp,
                             grad_clip=cfg.train.grad_clip, max_steps_per_epoch=cfg.train.max_steps_per_epoch)
            train_s += s["seconds"]
            losses[-1][name] = s["loss"]
            slowest = max(slowest, s["seconds"])
            replies.append(RecordDict({"arrays": pack(model.state_dict()),
                                       "metrics": MetricRecord({"num-examples": len(loaders["train"].dataset)})}))
        glob = unpack(aggregate_arrayrecords(replies, "num-examples"), glob)
        per_round.append(slowest)
        if central is not None:  # the coordinator's evaluation, as the federation does each round
            central_auc = central(glob)["test"]["auc"]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in glob.items()}, strict=True)
    aucs = {}
    for name, (bundle, loaders, _loss_fn) in sites.items():
        aucs[name] = evaluate(model, loaders["test"], device=device, n_classes=bundle.n_classes)["auc"]
    return {"wall_s": time.perf_counter() - t0, "train_s": train_s, "slowest_site_s": per_round, "train_loss": losses,
            "site_auc": aucs, "central_test_auc": central_auc if central is not None else None,
            "threads": torch.get_num_threads()}


def _site_bytes(run: Path) -> dict[str, list[int]]:
    """Serialised bytes of every train reply, per site, from the sites' audit logs."""
    out: dict[str, list[int]] = {}
    for audit in sorted(run.glob("sites/*/audit.jsonl")):
        for line in audit.read_text().splitlines():
            e = json.loads(line)
            if e.get("type") == "train" and "bytes" in e:
                out.setdefault(audit.parent.name, []).append(int(e["bytes"]))
    return out


def deployment(config_path: Path, overrides: list[str], out: Path, *,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """``fedmed demo`` (server + one client process per site on loopback), timed to its results.

    Launched as ``fedmed.experiments.demo.demo(...)`` in a fresh interpreter: the processes and commands
    of ``fedmed demo`` (``fedmed-server``, one ``fedmed-client`` per site), without the
    ``fedmed`` CLI importing every sub-command first (torch, Ray: 5-25 s here), which is
    no part of a deployment. ``env`` adds to the processes' environment
    (``FEDMED_NODE_POLL=3``: Flower's own idle poll).
    """
    if out.exists():
        shutil.rmtree(out)
    call = (f"import sys; from pathlib import Path; from fedmed.experiments.demo import demo; "
            f"sys.exit(demo(config=Path({str(config_path)!r}), rounds=None, out=Path({str(out)!r}), "
            f"overrides={list(overrides)!r}))")
    cmd = [sys.executable, "-c", call]
    load, t0 = _load(), time.time()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}).returncode
    if code != 0 or not (out / "summary.json").exists():
        raise RuntimeError(f"the benchmark federation failed (exit {code}); see {log}")
    end = (out / "summary.json").stat().st_mtime
    res = _federation_result(out, wall=end - t0, launch=t0, end=end, site_logs=True)
    res["startup_marks_s"] = _startup_marks(out, launch=t0)
    res["load_before"] = load
    return res


_MARKS = {"superlink_up": "Uvicorn running on", "sites_registered": "/v1/fleet/activate-node",
          "run_submitted": "/v1/control/start-run", "serverapp_started": "/v1/runtime/pull-task-input"}


def _startup_marks(out: Path, *, launch: float) -> dict[str, float]:
    """Seconds from launch to the SuperLink's start-up events (its own log's UTC timestamps)."""
    from datetime import datetime

    marks: dict[str, float] = {}
    for line in (out / "superlink.log").read_text(errors="replace").splitlines():
        stamp = line.split(" ", 1)[0]
        for name, text in _MARKS.items():
            if text in line and (name not in marks or name == "sites_registered"):
                try:
                    marks[name] = datetime.fromisoformat(stamp).timestamp() - launch
                except ValueError:
                    pass
        if len(marks) == len(_MARKS) and "pull-task-input" in line:
            break
    return marks


def simulation(cfg, out: Path) -> dict[str, Any]:
    """``fedmed simulate`` in this process (Flower's simulation engine), timed to its results.

    One Ray CPU per site, so every site trains side by side as in the deployment (on fewer
    cores than sites the sites share them, which their own training times then include).
    """
    from fedmed.experiments.simulate import simulate

    if out.exists():
        shutil.rmtree(out)
    load, t0 = _load(), time.time()
    simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=1, total_cpus=len(cfg.data.sites))
    end = (out / "summary.json").stat().st_mtime
    res = _federation_result(out, wall=end - t0, launch=t0, end=end, site_logs=False)
    res["engine"] = json.loads((out / "timing.json").read_text())
    res["load_before"] = load
    return res


_TASK_LINE = re.compile(r"INFO fedmed\.client: train task: input ([\d.]+)s, app ([\d.]+)s")


def _site_app_seconds(out: Path) -> dict[str, list[float]]:
    """Each site's ClientApp time per train task (from its own log: durations only, in order)."""
    return {log.parent.name: [float(m.group(2)) for m in _TASK_LINE.finditer(log.read_text(errors="replace"))]
            for log in sorted(out.glob("sites/*/clientapp.log"))}


def _slowest(row: dict[str, Any]) -> float:
    """The round's critical path: its slowest site's own training time."""
    return max((float(m.get("train_seconds", 0.0)) for m in row.get("train_per_site", {}).values()), default=0.0)


def split(history: list[dict[str, Any]], *, launch: float, end: float,
          app_s: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Where the wall time went, in seconds; the parts add up to ``end - launch``.

    *startup*: launch until round 1 starts, plus waiting for sites to connect; *site_setup*:
    round 1's start-up at the sites: with their logs (deployment) the slowest ClientApp's
    time beyond its training (data load, model build), else (simulation) round 1's delivery
    time beyond a later round's median (Ray's start, the actors' imports and data load);
    *critical*: the slowest site's training, each round; *wait_transfer*: the rest of each
    train phase (messages reaching the sites and back: the idle polls and the transfers; in
    rounds 2+ also the site's weight loading and packing); *aggregation*; *evaluation*: site
    and central evaluation; *reporting*: checkpoints, state and MLflow between rounds;
    *after*: the last round's end until the results are written (calibration, report, summary).
    """
    parts = dict.fromkeys(("startup", "site_setup", "critical", "wait_transfer", "aggregation", "evaluation",
                           "reporting", "after"), 0.0)
    parts["startup"] = history[0]["clock"]["start"] - launch
    steady = None  # without the sites' logs: a later round's median delivery time is round 1's too
    if not app_s and len(history) > 1:
        steady = float(np.median([r["timing"]["train"] - _slowest(r) for r in history[1:]]))
    for i, row in enumerate(history):
        t = row["timing"]
        crit = max((float(m.get("train_seconds", 0.0)) for m in row.get("train_per_site", {}).values()), default=0.0)
        setup = 0.0
        if i == 0 and app_s:
            # the slowest site's ClientApp time beyond its training, in round 1 (data load)
            per = {s: (a[0], float(row["train_per_site"][s]["train_seconds"])) for s, a in app_s.items()
                   if a and s in row.get("train_per_site", {})}
            if per:
                setup = max(max(a for a, _ in per.values()) - crit, 0.0)
        elif i == 0 and steady is not None:  # the simulation: Ray's start, the actors' imports and data
            setup = max(t["train"] - crit - steady, 0.0)
        parts["startup"] += t["wait_sites"]
        parts["site_setup"] += setup
        parts["critical"] += crit
        parts["wait_transfer"] += t["train"] - crit - setup
        parts["aggregation"] += t.get("aggregate", 0.0)
        parts["evaluation"] += t["site_eval"] + t["central_eval"]
        nxt = history[i + 1]["clock"]["start"] if i + 1 < len(history) else None
        done = row["clock"]["start"] + row["seconds"]
        if nxt is not None:
            parts["reporting"] += nxt - done
        else:
            parts["after"] = end - done
    return parts


def _federation_result(out: Path, *, wall: float, launch: float, end: float, site_logs: bool) -> dict[str, Any]:
    from fedmed.server.checkpoint import load_state

    state = load_state(out)
    last = state.history[-1]
    per_site = last.get("per_site", {})
    phases: dict[str, float] = {}
    for row in state.history:
        for k, v in (row.get("timing") or {}).items():
            phases[k] = phases.get(k, 0.0) + float(v)
    train_s = {s: sum(float(r.get("train_per_site", {}).get(s, {}).get("train_seconds", 0.0)) for r in state.history)
               for s in per_site}
    # The rounds' critical path: the slowest site's training in each round (the sites' own timings).
    critical = sum(max((float(m.get("train_seconds", 0.0)) for m in r.get("train_per_site", {}).values()), default=0.0)
                   for r in state.history)
    parts = split(state.history, launch=launch, end=end, app_s=_site_app_seconds(out) if site_logs else None)
    return {"wall_s": wall, "rounds": len(state.history), "round_s": [float(r["seconds"]) for r in state.history],
            "phases_s": phases, "site_train_s": train_s, "critical_train_s": critical,
            "over_critical": wall / critical if critical else None, "split_s": parts,
            "site_auc": {s: float(m.get("auc", float("nan"))) for s, m in per_site.items()},
            "central_test_auc": last.get("central_test_auc"),
            "mean_site_auc": float(np.mean([m.get("auc", np.nan) for m in per_site.values()])) if per_site else None,
            "bytes": _site_bytes(out), "out": str(out)}


def network(result: dict[str, Any], cfg) -> dict[str, Any]:
    """Bytes a site sends per round over the fp32 size of the model."""
    from fedmed.task import model_from_config
    from fedmed.transfer import nbytes

    model_bytes = nbytes(model_from_config(cfg).state_dict())
    ratios = [b / model_bytes for per in result["bytes"].values() for b in per]
    return {"model_fp32_bytes": model_bytes, "ratios": ratios}


AUC_TOLERANCE = 0.002  # the direct baseline must end where the federation ends
# The deployment as it was before this benchmark's cuts, measured beside it: Flower's 3 s
# node poll and 0.5 s reply wait, Flower's SuperExec (a fresh flwr-serverapp, its 1 s poll)
# instead of fedmed's warm ServerApp runner (played as a Flower release the runner does not
# support, so fedmed-server starts Flower's SuperExec), MLflow and central evaluation on the
# rounds' path. (The start-up imports and the server's and runner's pulls stay cut.)
UNCUT = {"FEDMED_NODE_POLL": "3", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", "FEDMED_TRACKING_INLINE": "1",
         "FEDMED_SERVER_COMPAT_REQUIRE": "fedmed.benchmarks_uncut:flower_superexec"}
UNCUT_OVERRIDES = ["federation.central_overlap=false"]


def run(work: Path, *, rounds: int = 4, local_epochs: int = 3, image_size: int = 64,
        long_rounds: int = 20) -> dict[str, Any]:
    """Direct vs deployment vs simulation on the same cohort and job, then the same job over
    ``long_rounds`` (0: skip); fp16 deployment for the network; Flower's 3 s idle poll beside ours.

    ``auc_match.ok`` is false when the direct baseline, the deployment and the simulation end
    at different central test AUCs (they compute the same thing): ``python -m benchmarks``
    then writes the numbers and exits 1.
    """
    from benchmarks.common import ROOT

    root = cohort(work / "cohort")

    def job_of(n: int) -> list[str]:
        # min_sites = every site: round 1 waits for all three, as the direct baseline trains all three
        return [f"federation.rounds={n}", f"federation.local_epochs={local_epochs}",
                f"federation.evaluate_every={n}", f"data.image_size={image_size}", "federation.min_sites=3"]

    job = job_of(rounds)
    cfg = bench_config(root, job + [f"federation.central_test={root / 'central'}"])
    base = [f"data.root={root}", "data.notes_column=null", f"federation.central_test={root / 'central'}",
            "train.progress=false"]
    conf = ROOT / "configs" / "default.yaml"
    res: dict[str, Any] = {"job": job, "sites": list(cfg.data.sites), "long_rounds": long_rounds}
    from fedmed.task import load_site_bundle

    for site in [*cfg.data.sites, "central"]:  # every run below starts with the decoded-image cache filled
        load_site_bundle(cfg, site_dir=root / site, progress=False)
    res["load_before"] = load = _load()
    res["direct"] = {**direct(cfg), "load_before": load}
    res["deployment"] = deployment(conf, base + job, work / "deploy-fp32")
    res["deployment_uncut"] = deployment(conf, base + job + UNCUT_OVERRIDES, work / "deploy-uncut", env=UNCUT)
    res["deployment_fp16"] = deployment(conf, base + job + ["federation.update_precision=fp16"],
                                        work / "deploy-fp16")
    res["simulation"] = simulation(cfg, work / "sim")
    res["network_fp32"] = network(res["deployment"], cfg)
    res["network_fp16"] = network(res["deployment_fp16"], cfg)
    if long_rounds:
        long_job = job_of(long_rounds)
        res["long_job"] = long_job
        res["deployment_long"] = deployment(conf, base + long_job, work / f"deploy-{long_rounds}")
        res["simulation_long"] = simulation(
            bench_config(root, long_job + [f"federation.central_test={root / 'central'}"]),
            work / f"sim-{long_rounds}")
    res["load_after"] = _load()
    aucs = {k: res[k]["central_test_auc"] for k in ("direct", "deployment", "simulation")}
    ok = (abs(aucs["direct"] - aucs["deployment"]) <= AUC_TOLERANCE
          and abs(aucs["simulation"] - aucs["deployment"]) <= AUC_TOLERANCE)
    if long_rounds:
        aucs.update({k: res[k]["central_test_auc"] for k in ("deployment_long", "simulation_long")})
        ok = ok and abs(aucs["deployment_long"] - aucs["simulation_long"]) <= AUC_TOLERANCE
    # `python -m benchmarks` writes the numbers, then fails when this is false
    res["auc_match"] = {**aucs, "tolerance": AUC_TOLERANCE, "ok": ok}
    return res


def _load() -> list[float]:
    """``uptime``'s load averages (1, 5, 15 min): how busy the shared machine was."""
    return [round(x, 2) for x in os.getloadavg()]


# -- what docs/benchmarks.md shows (python -m benchmarks calls these) --------------------------

_RUNS = (("direct", "direct (one process, sites one after another)"),
         ("deployment", "deployment (fedmed-server + 3 fedmed-client, loopback)"),
         ("deployment_uncut", "deployment without the cuts (Flower's 3 s node poll, Flower's SuperExec at its "
                              "1 s poll, MLflow and central evaluation inline)"),
         ("deployment_fp16", "deployment, fp16 updates"),
         ("simulation", "simulation (fedmed simulate, Ray)"),
         ("deployment_long", "deployment"), ("simulation_long", "simulation"))
_PARTS = ("startup", "site_setup", "critical", "wait_transfer", "aggregation", "evaluation", "reporting", "after")


def _loads(r: dict[str, Any]) -> str:
    return "/".join(map(str, r.get("load_before", []))) or "-"


def _ratio(r: dict[str, Any]) -> float:
    return r["wall_s"] / r["critical_train_s"]


def summary_rows(f: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, target, verdict) rows of the headline table."""
    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows: list[tuple[str, str, str, str]] = []
    n, long = f["deployment"]["rounds"], f.get("long_rounds") or 0
    for key, label, target in (("deployment", "deployment", 1.25), ("simulation", "simulation", 1.15)):
        rows.append((f"Overhead, {label}, {n} rounds (wall ÷ critical path)", f"**{_ratio(f[key]):.2f}**",
                     "report", "-"))
        if f"{key}_long" in f:
            r = _ratio(f[f"{key}_long"])
            rows.append((f"Overhead, {label}, {long} rounds (wall ÷ critical path)", f"**{r:.2f}**", f"≤ {target}",
                         mark(r <= target)))
    m = f.get("auc_match")
    if m:
        rows.append(("Direct baseline = federation (central test AUC: direct / deployment / simulation)",
                     f"{m['direct']:.4f} / {m['deployment']:.4f} / {m['simulation']:.4f}",
                     f"equal (± {m['tolerance']})", mark(bool(m["ok"]))))
    if "deployment_uncut" in f:
        u, c = f["deployment_uncut"], f["deployment"]
        rows.append((f"Cuts (node poll, warm ServerApp runner, MLflow and central evaluation off the path), "
                     f"{n} rounds: wall before → after",
                     f"{u['wall_s']:.1f} s → **{c['wall_s']:.1f} s** (×{c['wall_s'] / u['wall_s']:.2f}); "
                     f"÷ critical {_ratio(u):.2f} → {_ratio(c):.2f}", "report", "-"))
    rows.append(("Deployment wall ÷ the same computation run directly, sites one after another",
                 f"**{f['deployment']['wall_s'] / f['direct']['wall_s']:.2f}**", "report", "-"))
    for key, label, limit in (("network_fp32", "Network, fp32 (bytes a site sends per round ÷ fp32 model size)", 1.02),
                              ("network_fp16", "Network, fp16 updates (same ratio)", 0.51)):
        if key in f:
            r = sorted(f[key]["ratios"])
            rows.append((label, f"{r[0]:.3f} / **{r[len(r) // 2]:.3f}** / {r[-1]:.3f}", f"≤ {limit}",
                         mark(r[-1] <= limit)))
    if "deployment_fp16" in f:
        a32, a16 = f["deployment"]["central_test_auc"], f["deployment_fp16"]["central_test_auc"]
        rows.append(("fp16 updates: loss of central test AUC vs fp32", f"**{a32 - a16:+.4f}** ({a32:.4f} → {a16:.4f})",
                     "≤ 0.005", mark(a32 - a16 <= 0.005)))
    return rows


def doc_lines(f: dict[str, Any]) -> list[str]:
    """The federation section of docs/benchmarks.md."""
    n, long = f["deployment"]["rounds"], f.get("long_rounds") or 0
    d = f["direct"]
    lines = ["### Federation overhead against the critical path", "",
             "Command: `flock /tmp/fedmed-bench.lock flock /tmp/fedmed-deploy.lock python -m benchmarks --only "
             "federation` (part of `make bench`); raw numbers in `runs/benchmarks/results.json`. Each run below "
             "ran once (a 20-round deployment takes minutes); the ratios are side by side in one invocation.", "",
             f"Job: sites {', '.join(f['sites'])}; {', '.join(f['job'])}; central evaluation each round, site "
             "evaluation in the last, federated temperature scaling after it. *Critical path* = the slowest site's "
             "training in each round, summed over rounds, from the sites' own `train_seconds` (a duration: nothing "
             "identifying). *Direct* = the same computation in one process, one thread, sites one after another "
             "(`benchmarks.federation.direct`: the server's initial model and learning-rate schedule, the ClientApp's "
             "per-round reseed, fedmed's `train_epochs`, Flower's FedAvg, replies in the same order); its critical "
             "path is the slowest site's training per round there. *Deployment* = `fedmed demo` (a real "
             "`fedmed-server` and one `fedmed-client` process per site, loopback; launched as "
             "`fedmed.experiments.demo.demo` in a fresh interpreter, i.e. without the `fedmed` CLI importing "
             "every sub-command first, torch and Ray, which no deployment runs), wall time from launch until "
             "`summary.json` is written; its sites share the "
             "machine's 2 cores, so each trains slower than alone (the critical path includes that). "
             "*Simulation* = `fedmed simulate`, one Ray CPU per site so the sites train side by side as in the "
             "deployment. Load average (1/5/15 min) before the runs "
             f"{'/'.join(map(str, f.get('load_before', [])))}, "
             f"after {'/'.join(map(str, f.get('load_after', [])))}.", "",
             "| run | rounds | wall s | critical s | wall ÷ critical | " + " | ".join(_PARTS)
             + " | central test AUC | load |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(_PARTS) + "---:|---|"]
    crit_direct = sum(d.get("slowest_site_s", []))
    lines.append(f"| {_RUNS[0][1]} | {n} | {d['wall_s']:.1f} | {crit_direct:.1f} | "
                 f"{d['wall_s'] / crit_direct if crit_direct else float('nan'):.2f} | "
                 + " | ".join("-" for _ in _PARTS)
                 + f" | {d['central_test_auc']:.4f} | {_loads(d)} |")
    for key, label in _RUNS[1:]:
        if key in f:
            r = f[key]
            lines.append(f"| {label} | {r['rounds']} | {r['wall_s']:.1f} | {r['critical_train_s']:.1f} | "
                         f"**{_ratio(r):.2f}** | " + " | ".join(f"{r['split_s'][p]:.1f}" for p in _PARTS)
                         + f" | {r['central_test_auc']:.4f} | {_loads(r)} |")
    lines += ["", "Parts (seconds, adding up to the wall): *startup* = launch until round 1 starts, plus waiting for "
              "sites to connect; *site_setup* = round 1's start-up at the sites (deployment: the slowest ClientApp's "
              "time beyond its training, from the sites' logs: loading the data, building the model; simulation: "
              "round 1's delivery time beyond a later round's median: Ray's start, the actors' imports and data "
              "load); *wait_transfer* = the rest "
              "of each round's train phase (messages reaching the sites and back: idle polls, serialisation, "
              "transfer); *evaluation* = site and central evaluation; *reporting* = checkpoints, state and tracking "
              "between rounds; *after* = from the last round until the results are written (calibration, "
              "report, summary)."]
    for key in ("deployment", "simulation"):
        if f"{key}_long" in f:
            a, b = f[key], f[f"{key}_long"]
            per_wall = (b["wall_s"] - a["wall_s"]) / (long - n)
            per_crit = (b["critical_train_s"] - a["critical_train_s"]) / (long - n)
            fixed = b["split_s"]["startup"] + b["split_s"]["site_setup"] + b["split_s"]["after"]
            lines += ["", f"{key.capitalize()}, fixed against per-round cost: a round beyond the {n}th added "
                      f"{per_wall:.1f} s of wall for {per_crit:.1f} s of critical path (marginal ratio "
                      f"{per_wall / per_crit if per_crit else float('nan'):.2f}); "
                      "start-up, the sites' set-up and the work after the "
                      f"rounds cost {fixed:.1f} s once ({fixed / b['wall_s']:.0%} of the {long}-round wall)."]
    if "deployment_uncut" in f:
        u, c = f["deployment_uncut"]["split_s"], f["deployment"]["split_s"]
        lines += ["", "Cuts, measured side by side in this run (deployment without → with them, seconds): "
                  + ", ".join(f"{p} {u[p]:.1f} → {c[p]:.1f}" for p in _PARTS if abs(u[p] - c[p]) >= 0.5)
                  + ". (1) The SuperNode's idle poll: Flower 1.42 sleeps a hard-coded 3 s between asks when idle "
                  "(`flwr.supernode.start_client_internal`, no setting), so each message waited 1.5 s on average "
                  "before a site saw it; `fedmed-client` runs Flower's node through `fedmed.client.node`, its "
                  "sleeps capped at 0.25 s (`--poll`, checked at start-up in `client/flower_compat.py`, Flower's "
                  "node unchanged when the check fails). (2) Flower's SuperExec looks for the ServerApp's task "
                  "every 1 s as long as it lives and starts a fresh `flwr-serverapp` that imports torch only "
                  "once the run is there; fedmed's warm ServerApp runner (`server/warm.py`, the SuperLink at "
                  "`--isolation process`) imports it while the SuperLink starts, takes the task and runs it "
                  "in that process (Flower's SuperExec, at the 0.1 s poll, when the check fails). (3) MLflow (its "
                  "import and database creation before round 1, each round's log) runs on its own thread "
                  "(`server/tracking.py` `BackgroundTracker`: the same calls in the same order), and only once "
                  "round 1's messages are out. (4) Central evaluation of round N runs once round N+1's messages "
                  "are out, while the sites train it (`federation.central_overlap`; with early stopping and in "
                  "the last round on a thread beside the sites' evaluation). "
                  "(5) The node's 0.5 s waits on its own state (its reply to upload) look every 20 ms. "
                  "Not toggled here (in both rows): Flower's 1 s first backoff when a message's objects are not "
                  "uploaded yet (the sender sends the message first, so a prompt pull nearly always hit it) is "
                  "0.05 s for the ServerApp's grid (`server/flower_compat.py`) and the node; "
                  "the server pulls a round's replies every 0.5 s until 70% of "
                  "the shortest round so far, then every 0.05 s (was 0.2 s throughout; 0.05 s for evaluation and "
                  "calibration); the runner re-asks for a task's objects at most 0.1 s apart (was 0.5); the "
                  "coordinator no longer imports timm, torchvision or matplotlib before round 1. Results are "
                  "identical: the same central test AUC with and without the cuts (table)."]
    if "deployment_long" in f:  # the ratio alone flatters a busy machine: its sites train slower
        r, sp = f["deployment_long"], f["deployment_long"]["split_s"]
        over = r["wall_s"] - r["critical_train_s"]
        lines += ["", f"Deployment, {r['rounds']} rounds, overhead in seconds: {over:.1f} "
                  f"(start-up {sp['startup']:.1f}, site set-up {sp['site_setup']:.1f}, delivery "
                  f"{sp['wait_transfer']:.1f} = {sp['wait_transfer'] / r['rounds']:.2f} a round, evaluation "
                  f"{sp['evaluation']:.1f}, reporting {sp['reporting']:.1f}, after the rounds {sp['after']:.1f}) on a "
                  f"{r['critical_train_s']:.1f} s critical path (load {_loads(r)}). A busier machine stretches the "
                  "sites' training, the critical path, more than this overhead, so the ratio improves with load: "
                  "compare runs by these seconds, at similar load."]
    for key, target in (("deployment_long", 1.25), ("simulation_long", 1.15)):
        if key in f and _ratio(f[key]) > target:
            r, sp = f[key], f[key]["split_s"]
            over, allowed = r["wall_s"] - r["critical_train_s"], (target - 1) * r["critical_train_s"]
            per_round_s = (sp["wait_transfer"] + sp["evaluation"] + sp["reporting"] + sp["aggregation"]) / r["rounds"]
            lines += ["", f"**Missed:** {key.split('_')[0]}, {r['rounds']} rounds: {_ratio(r):.2f} > {target}. "
                      f"Overhead {over:.1f} s where {allowed:.1f} s would meet it: "
                      f"fixed {sp['startup'] + sp['site_setup'] + sp['after']:.1f} s "
                      f"(start-up {sp['startup']:.1f}, site set-up {sp['site_setup']:.1f}, "
                      f"after the rounds {sp['after']:.1f}), per round {per_round_s:.2f} s "
                      f"(delivery {sp['wait_transfer'] / r['rounds']:.2f}, "
                      f"evaluation {sp['evaluation'] / r['rounds']:.2f}) on a "
                      f"{r['critical_train_s'] / r['rounds']:.1f} s critical round. "
                      "What is left per round is the message path: the node's idle ask of the SuperLink "
                      "(at most 0.25 s) and the runner's of its node (0.2 s), each update crossing gateway, "
                      "SuperLink, SuperNode and runner over HTTP, on cores the sites' training also uses; "
                      "not cut: shorter idle polls (each is an HTTP request the SuperLink answers on those "
                      "cores)."]
    marks = f["deployment"].get("startup_marks_s")
    if marks:
        lines += ["", "Deployment start-up, seconds after launch (from the SuperLink's log): " +
                  ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))
                  + f"; round 1 started at {f['deployment']['split_s']['startup']:.1f}."]
    for key in ("network_fp32", "network_fp16"):
        if key in f:
            nw = f[key]
            lines += ["", f"{key}: model {nw['model_fp32_bytes']:,} bytes fp32; per-reply ratios "
                      + ", ".join(f"{r:.4f}" for r in nw["ratios"]) + "."]
    return lines + [""]
