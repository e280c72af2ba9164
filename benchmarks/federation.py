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
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import bench_config, cohort, site_setup

__all__ = ["direct", "deployment", "simulation", "network"]


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
    import torch

    from fedmed.server.central import make_central_eval
    from fedmed.task import model_from_config, seed_everything
    from fedmed.train.loop import evaluate, make_optimizer, train_epochs

    t0 = time.perf_counter()
    sites = {}
    for name in cfg.data.sites:
        bundle, loaders, loss_fn, device = site_setup(cfg, name)
        sites[name] = (bundle, loaders, loss_fn)
    central = make_central_eval(cfg)
    seed_everything(cfg.train.seed)
    model = model_from_config(cfg).to(device)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_s, central_auc = 0.0, None
    for _ in range(cfg.federation.rounds):
        updates, weights = [], []
        for name, (bundle, loaders, loss_fn) in sites.items():
            model.load_state_dict(glob)
            opt = make_optimizer(model, cfg.train)
            s = train_epochs(model, loaders["train"], loss_fn=loss_fn, optimizer=opt, device=device,
                             epochs=cfg.federation.local_epochs, amp=cfg.train.amp)
            train_s += s["seconds"]
            updates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(loaders["train"].dataset))
        total = sum(weights)
        glob = {k: (sum(u[k].double() * w for u, w in zip(updates, weights)) / total).to(v.dtype)
                for k, v in glob.items()}
        if central is not None:  # the coordinator's evaluation, as the federation does each round
            central_auc = central({k: v.cpu().numpy() for k, v in glob.items()})["test"]["auc"]
    model.load_state_dict(glob)
    aucs = {}
    for name, (bundle, loaders, loss_fn) in sites.items():
        aucs[name] = evaluate(model, loaders["test"], device=device, n_classes=bundle.n_classes)["auc"]
    return {"wall_s": time.perf_counter() - t0, "train_s": train_s, "site_auc": aucs,
            "central_test_auc": central_auc if central is not None else None,
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


def deployment(config_path: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    """``fedmed demo`` (server + one client process per site on loopback), timed to its results."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(Path(sys.executable).parent / "fedmed"), "demo", "-c", str(config_path), "--out", str(out),
           *overrides]
    t0 = time.time()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    if code != 0 or not (out / "summary.json").exists():
        raise RuntimeError(f"the benchmark federation failed (exit {code}); see {log}")
    return _federation_result(out, wall=(out / "summary.json").stat().st_mtime - t0)


def simulation(cfg, out: Path) -> dict[str, Any]:
    """``fedmed simulate`` in this process (Flower's simulation engine), timed to its results."""
    from fedmed.experiments.simulate import simulate

    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=1)
    res = _federation_result(out, wall=(out / "summary.json").stat().st_mtime - t0)
    res["engine"] = json.loads((out / "timing.json").read_text())
    return res


def _federation_result(out: Path, *, wall: float) -> dict[str, Any]:
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
    # The rounds' critical path: the slowest site's training in each round.
    critical = sum(max((float(m.get("train_seconds", 0.0)) for m in r.get("train_per_site", {}).values()), default=0.0)
                   for r in state.history)
    return {"wall_s": wall, "rounds": len(state.history), "round_s": [float(r["seconds"]) for r in state.history],
            "phases_s": phases, "site_train_s": train_s, "critical_train_s": critical,
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


def run(work: Path, *, rounds: int = 4, local_epochs: int = 3, image_size: int = 64) -> dict[str, Any]:
    """Direct vs deployment vs simulation on the same cohort and job; fp16 deployment for the network."""
    from benchmarks.common import ROOT

    root = cohort(work / "cohort")
    job = [f"federation.rounds={rounds}", f"federation.local_epochs={local_epochs}",
           f"federation.evaluate_every={rounds}", f"data.image_size={image_size}"]
    cfg = bench_config(root, job + [f"federation.central_test={root / 'central'}"])
    base = [f"data.root={root}", "data.notes_column=null", f"federation.central_test={root / 'central'}",
            "train.progress=false"]
    res: dict[str, Any] = {"job": job, "sites": list(cfg.data.sites)}
    from fedmed.task import load_site_bundle

    for site in [*cfg.data.sites, "central"]:  # every run below starts with the decoded-image cache filled
        load_site_bundle(cfg, site_dir=root / site, progress=False)
    res["direct"] = direct(cfg)
    res["deployment"] = deployment(ROOT / "configs" / "default.yaml", base + job, work / "deploy-fp32")
    res["deployment_fp16"] = deployment(ROOT / "configs" / "default.yaml",
                                        base + job + ["federation.update_precision=fp16"], work / "deploy-fp16")
    res["simulation"] = simulation(cfg, work / "sim")
    res["network_fp32"] = network(res["deployment"], cfg)
    res["network_fp16"] = network(res["deployment_fp16"], cfg)
    return res
