"""Scale: 10 / 30 / 100 simulated sites (peak memory, steady round) and model size (bytes, aggregation).

*Sites*: each site is a small synthetic hospital (the same size at every scale), so the
work per round grows linearly with the number of sites; memory must grow at most
linearly too (Flower's simulation engine runs a fixed pool of ClientApp actors, not one
per site; the server holds every reply of a round).

*Model size*: for models of about 0.4M to 24M parameters (fusion ``embed_dim`` and the
image backbone varied), the bytes Flower serialises for one site's train reply and for
the server's train message (``flower_compat.wire_bytes``: what it pushes), and the time
the server's aggregation takes (FedAvg ``aggregate_train`` + unpacking, as in
:func:`fedmed.server.federation.run_federation`) for 3 and 10 replies, median of repeats.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, bench_config, cohort

__all__ = ["measure", "model_size", "MODELS"]

# (label, overrides): 0.4M → 24M parameters
MODELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fusion, small_cnn, embed 64 (default)", ()),
    ("fusion, small_cnn, embed 128", ("model.embed_dim=128",)),
    ("fusion, small_cnn, embed 256", ("model.embed_dim=256",)),
    ("fusion, small_cnn, embed 512", ("model.embed_dim=512",)),
    ("fusion, resnet18, embed 64", ("model.backbone=resnet18",)),
    ("fusion, resnet50, embed 64", ("model.backbone=resnet50",)),
)


def measure(work: Path, *, sizes: tuple[int, ...] = (10, 30, 100), rounds: int = 3,
            patients: int = 24, image_size: int = 32) -> dict[str, Any]:
    """``fedmed simulate`` over each number of sites: wall, start-up, steady round, peak memory."""
    import json

    from fedmed.experiments.simulate import simulate

    rows = []
    for n in sizes:
        root = _cohort(work / f"sites{n}", sites=n, image_size=image_size, patients=patients)
        cfg = bench_config(root, [f"federation.rounds={rounds}", "federation.local_epochs=1",
                                  f"federation.evaluate_every={rounds}", f"data.image_size={image_size}",
                                  "train.batch_size=16", "data.augment=false"])
        out = work / f"sim{n}"
        load = [round(x, 2) for x in os.getloadavg()]
        simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=1)
        t = json.loads((out / "timing.json").read_text())
        rows.append({"sites": n, "total_s": t["total_s"], "startup_s": t["startup_s"],
                     "steady_round_s": t["steady_round_s"], "round_s": t["round_s"],
                     "peak_rss_mb": t["peak_rss_mb"], "load_before": load})
    # Linear fit of memory on sites: the intercept is the engine, the slope the cost of a site.
    x = np.array([r["sites"] for r in rows], dtype=float)
    y = np.array([r["peak_rss_mb"] for r in rows], dtype=float)
    slope, intercept = (np.polyfit(x, y, 1) if len(rows) > 1 else (0.0, float(y[0])))
    # "At most linear": memory grows no faster than the number of sites (ratio ≤ 1).
    growth = (rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]) / (rows[-1]["sites"] / rows[0]["sites"])
    steady = [r["steady_round_s"] / r["sites"] for r in rows]
    return {"rows": rows, "mem_slope_mb_per_site": float(slope), "mem_intercept_mb": float(intercept),
            "mem_growth_over_site_growth": float(growth), "steady_round_s_per_site": steady,
            "patients_per_site": patients, "image_size": image_size, "rounds": rounds,
            "ray_cpus": os.cpu_count(), "models": model_size()}


def _cohort(root: Path, *, sites: int, image_size: int, patients: int) -> Path:
    """``sites`` synthetic sites under ``root``; the synthesiser writes at most 64 at a time,
    so beyond that further batches (another seed) are written aside and copied in renamed."""
    import shutil

    from fedmed.data.importers.synth import synthesize

    if (root / "fedmed-data.yaml").exists():
        return root
    first = min(sites, 64)
    cohort(root, sites=first, central=0, image_size=image_size, patients=[patients] * first)
    done, batch = first, 1
    while done < sites:
        n = min(sites - done, 64)
        extra = root.parent / f"{root.name}-batch{batch}"
        shutil.rmtree(extra, ignore_errors=True)
        synthesize(extra, sites=n, central=0, image_size=image_size, patients_per_site=[patients] * n,
                   notes=False, seed=batch)
        for site in sorted(p for p in extra.iterdir() if (p / "records.csv").exists()):
            shutil.copytree(site, root / f"b{batch}_{site.name}")
        shutil.rmtree(extra)
        done, batch = done + n, batch + 1
    return root


def _train_message(current: Any, dst: int) -> Any:
    """The server's train message to node ``dst`` (weights and the round's config)."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from fedmed.messages import CONFIG_KEY

    md = Metadata(run_id=1, message_id=f"m{dst}", src_node_id=0, dst_node_id=dst, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=600.0, message_type="train")
    return Message(metadata=md, content=RecordDict({"arrays": current, CONFIG_KEY: ConfigRecord({"server-round": 1})}))


def _replies(current: Any, n: int, rng: np.random.Generator) -> list[Any]:
    """``n`` train replies as sites send them (fedmed's reply builder), to one train message."""
    from flwr.app import Array, ArrayRecord

    from fedmed.messages import make_reply

    out = []
    for i in range(n):
        req = _train_message(current, i + 1)
        arrays = ArrayRecord({k: Array((a.numpy() + rng.standard_normal(a.shape).astype(a.numpy().dtype) * 1e-3)
                                       if a.numpy().dtype.kind == "f" else a.numpy()) for k, a in current.items()})
        out.append(make_reply(req, site=f"site{i}", metrics={"num-examples": 10 + i}, arrays=arrays))
    return out


def model_size(*, repeats: int = 5, replies: tuple[int, ...] = (3, 10)) -> list[dict[str, Any]]:
    """Bytes per site and round, and the server's aggregation time, for each of :data:`MODELS`."""
    import torch

    from fedmed.client.flower_compat import wire_bytes
    from fedmed.config import load_config
    from fedmed.server.strategies import make_strategy
    from fedmed.task import model_from_config
    from fedmed.transfer import pack, unpack

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for label, overrides in MODELS:
            cfg = load_config(ROOT / "configs" / "default.yaml", ["data.notes_column=null", *overrides])
            state = {k: v.detach().cpu().numpy() for k, v in model_from_config(cfg).state_dict().items()}
            params = int(sum(a.size for a in state.values()))
            current = pack(state)
            down = _train_message(current, 1)
            rng = np.random.default_rng(0)
            row: dict[str, Any] = {"model": label, "overrides": list(overrides), "params": params,
                                   "fp32_bytes": params * 4, "down_bytes": wire_bytes(down)}
            for n in replies:
                msgs = _replies(current, n, rng)
                row["up_bytes"] = wire_bytes(msgs[0])
                strategy = make_strategy(cfg.federation)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    agg, _m = strategy.aggregate_train(1, msgs)
                    unpack(agg, state)
                    times.append(time.perf_counter() - t)
                row[f"aggregate_{n}_s"] = statistics.median(times)
                del msgs
            row["bytes_per_round_3_sites"] = 3 * (row["up_bytes"] + row["down_bytes"])
            rows.append(row)
    finally:
        torch.set_num_threads(old)
    return rows


def summary_rows(sc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, target, verdict) rows of the headline table."""
    g = sc["mem_growth_over_site_growth"]
    big = sc["rows"][-1]
    rows = [(f"Scale {'/'.join(str(r['sites']) for r in sc['rows'])} sites: peak-memory growth ÷ site growth",
             f"**{g:.2f}**", "≤ 1 (at most linear)", "met" if g <= 1.0 else "**missed**"),
            (f"Scale: {big['sites']} simulated sites, peak memory (MiB) / steady round (s)",
             f"**{big['peak_rss_mb']:.0f}** / **{big['steady_round_s']:.1f}**", "fits in 24 GB",
             "met" if big["peak_rss_mb"] < 24 * 1024 else "**missed**")]
    m = sc.get("models")
    if m:
        a, b = m[0], m[-1]
        rows.append((f"Model size {a['params'] / 1e6:.1f}M → {b['params'] / 1e6:.1f}M parameters: bytes per reply "
                     "÷ fp32 size; aggregation of 3 replies (ms)",
                     f"{a['up_bytes'] / a['fp32_bytes']:.3f} → {b['up_bytes'] / b['fp32_bytes']:.3f}; "
                     f"{a['aggregate_3_s'] * 1e3:.1f} → {b['aggregate_3_s'] * 1e3:.1f}", "report (linear)", "-"))
    return rows


def doc_lines(sc: dict[str, Any]) -> list[str]:
    """The scale section of docs/benchmarks.md."""
    lines = ["### Scale", "",
             "Command: `flock /tmp/fedmed-bench.lock python -m benchmarks --only scale` "
             "(part of `make bench`).", "",
             f"`fedmed simulate` over N synthetic sites of {sc['patients_per_site']} patients each "
             f"({sc['image_size']}px, 1 local epoch, batch 16), {sc['rounds']} rounds; {sc['ray_cpus']} Ray CPUs, "
             "1 per site (so 2 sites train at a time); peak memory = resident memory of the whole process tree "
             "(benchmark process, Ray and its workers), sampled every second.", "",
             "| sites | total s | start-up s | steady round s | steady round s per site | peak memory MiB "
             "| load before |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['sites']} | {r['total_s']:.1f} | {r['startup_s']:.1f} | {r['steady_round_s']:.1f} | "
              f"{r['steady_round_s'] / r['sites']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{'/'.join(map(str, r['load_before']))} |"
              for r in sc["rows"]]
    lines += ["", f"Memory fit: {sc['mem_intercept_mb']:.0f} MiB + {sc['mem_slope_mb_per_site']:.1f} MiB per site; "
              f"growth from {sc['rows'][0]['sites']} to {sc['rows'][-1]['sites']} sites "
              f"{sc['mem_growth_over_site_growth']:.2f}× the growth in sites.", ""]
    m = sc.get("models")
    if m:
        lines += ["Model size (`benchmarks.scale.model_size`): the bytes Flower serialises for one site's train "
                  "reply (up) and the server's train message (down, weights + round number; the real one adds "
                  "the job, a few kB), and the server's aggregation (Flower's FedAvg `aggregate_train` + unpacking, "
                  "as `run_federation` times it) of 3 and 10 replies, one thread, median of 5.", "",
                  "| model | parameters | up bytes | up ÷ fp32 | down bytes | bytes per round, 3 sites | "
                  "aggregate 3 ms | aggregate 10 ms | ns per parameter and reply |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['params']:,} | {r['up_bytes']:,} | {r['up_bytes'] / r['fp32_bytes']:.4f} | "
                  f"{r['down_bytes']:,} | {r['bytes_per_round_3_sites']:,} | {r['aggregate_3_s'] * 1e3:.1f} | "
                  f"{r['aggregate_10_s'] * 1e3:.1f} | {r['aggregate_10_s'] / (10 * r['params']) * 1e9:.2f} |"
                  for r in m]
        lines.append("")
    return lines
