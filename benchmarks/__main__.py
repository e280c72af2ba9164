"""Run every fedmed benchmark side by side and write docs/benchmarks.md.

    python -m benchmarks [--out runs/benchmarks] [--doc docs/benchmarks.md] [--only NAME ...]

Every result is a ratio measured against its baseline in the same run, so it holds on a
noisy machine; min/median/max are over repeats where a benchmark repeats. Raw numbers go
to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import ROOT, machine

BENCHES = ("trainer", "dp", "pretrained", "data_path", "federation", "scale")


def _run_all(work: Path, only: set[str]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {}
    if "trainer" in only:
        from benchmarks import trainer
        steps["trainer"] = lambda: trainer.measure(work)
    if "dp" in only:
        from benchmarks import dp_step
        # One thread: on a shared machine a 2-thread step mostly measures the neighbours;
        # the 2-thread figure is kept in the details.
        steps["dp"] = lambda: {**dp_step.measure(batch=32, repeats=7, threads=1),
                               "two_threads": dp_step.measure(batch=32, repeats=5, threads=2)}
    if "pretrained" in only:
        from benchmarks import pretrained
        steps["pretrained"] = lambda: pretrained.measure(size=64, batch=32, threads=1)
    if "data_path" in only:
        from benchmarks import data_path
        steps["data_path"] = lambda: data_path.measure(work)
    if "federation" in only:
        from benchmarks import federation
        steps["federation"] = lambda: federation.run(work)
    if "scale" in only:
        from benchmarks import scale
        steps["scale"] = lambda: scale.measure(work)
    for name, fn in steps.items():
        t = time.perf_counter()
        print(f"[benchmarks] {name} ...", flush=True)
        res[name] = fn()
        res[name]["bench_seconds"] = round(time.perf_counter() - t, 1)
        print(f"[benchmarks] {name} done in {res[name]['bench_seconds']:.0f}s", flush=True)
    return res


def _fmt(s: dict[str, float] | None, nd: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['min']:.{nd}f} / **{s['median']:.{nd}f}** / {s['max']:.{nd}f}"


def _one(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"**{v:.{nd}f}**"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def summary_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, target, verdict) for the headline table."""
    rows: list[tuple[str, str, str, str]] = []
    if "trainer" in res:
        r = res["trainer"]["ratio"]
        rows.append(("Trainer efficiency (fedmed samples/s ÷ minimal loop)", _fmt(r), "≥ 0.95", _mark(r["median"] >= 0.95)))
    if "federation" in res:
        f = res["federation"]
        d = f["direct"]["wall_s"]
        for key, label in (("deployment", "real deployment, loopback"), ("simulation", "simulation engine")):
            if key in f:
                ratio = f[key]["wall_s"] / d
                rows.append((f"Federation overhead, {label} (wall ÷ direct training)", _one(ratio), "≤ 1.15",
                             _mark(ratio <= 1.15)))
        n32, n16 = f.get("network_fp32"), f.get("network_fp16")
        if n32:
            r = n32["ratios"]
            s = {"min": min(r), "median": sorted(r)[len(r) // 2], "max": max(r)}
            rows.append(("Network, fp32 (bytes a site sends per round ÷ fp32 model size)", _fmt(s, 3), "≤ 1.02",
                         _mark(s["max"] <= 1.02)))
        if n16:
            r = n16["ratios"]
            s = {"min": min(r), "median": sorted(r)[len(r) // 2], "max": max(r)}
            rows.append(("Network, fp16 updates (same ratio)", _fmt(s, 3), "≤ 0.51", _mark(s["max"] <= 0.51)))
            a32, a16 = f["deployment"].get("central_test_auc"), f["deployment_fp16"].get("central_test_auc")
            if a32 is not None and a16 is not None:
                loss = a32 - a16
                rows.append(("fp16 updates: loss of central test AUC vs fp32", f"**{loss:+.4f}** ({a32:.4f} → {a16:.4f})",
                             "≤ 0.005", _mark(loss <= 0.005)))
    if "dp" in res:
        r = res["dp"]
        s = {"min": r["ratio_min"], "median": r["ratio_median"], "max": r["ratio_max"]}
        rows.append(("Privacy cost (DP-SGD step ÷ plain step, fusion model)", _fmt(s), "≤ 2.0", _mark(s["median"] <= 2.0)))
    if "pretrained" in res:
        r = res["pretrained"]
        rows.append((f"Pretrained EfficientNet-Lite0, {r['size']} px: fine-tuning images/s ({r['device']})",
                     _fmt(r["finetune_images_per_s"], 1), "report", "-"))
        if "dp_frozen" in r:
            d = r["dp_frozen"]
            s = {"min": d["ratio_min"], "median": d["ratio_median"], "max": d["ratio_max"]}
            rows.append(("Privacy cost, pretrained frozen backbone (DP step ÷ plain step)", _fmt(s), "≤ 2.0",
                         _mark(s["median"] <= 2.0)))
    if "scale" in res:
        sc = res["scale"]
        g = sc["mem_growth_over_site_growth"]
        rows.append((f"Scale {'/'.join(str(r['sites']) for r in sc['rows'])} sites: peak-memory growth ÷ site growth",
                     _one(g), "≤ 1 (at most linear)", _mark(g <= 1.0)))
    if "data_path" in res:
        r = res["data_path"]["ratio"]
        rows.append(("Data path (epoch from the decoded-image cache ÷ first, decoding epoch)", _fmt(r), "< 1 (report)",
                     _mark(r["median"] < 1.0)))
    return rows


def write_doc(res: dict[str, Any], mach: dict[str, Any], doc: Path, *, command: str, total_s: float) -> None:
    lines = ["# Benchmarks", "",
             "Every number is a ratio against its baseline measured side by side in the same run "
             "(min / **median** / max over repeats where the benchmark repeats). Produced by one command:", "",
             "```bash", command, "```", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GiB RAM, GPU: {mach['gpu']}; "
             f"{mach['os']}; Python {mach['python']}, torch {mach['torch']}, flwr {mach['flwr']}; "
             f"commit {mach['commit']}; load average before the run {mach['load_before']}. "
             f"Whole run: {total_s / 60:.1f} min.", "",
             "| benchmark | measured | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(res)]
    lines += ["", "## Details", ""]
    if "trainer" in res:
        t = res["trainer"]
        lines += ["### Trainer efficiency", "",
                  f"fedmed's `train_epochs` vs a five-line PyTorch loop on the same model, dataset object, batch "
                  f"size ({t['batch_size']}) and optimizer, runs of {t['samples_per_epoch']} samples each, "
                  f"alternating; {t['threads']} thread(s) on {t['device']}. Samples/s: fedmed {_fmt(t['fedmed_samples_per_s'], 1)}, "
                  f"minimal {_fmt(t['minimal_samples_per_s'], 1)}; samples per CPU-second ratio {_fmt(t['cpu_ratio'])}.", ""]
    if "federation" in res:
        f = res["federation"]
        d = f["direct"]
        lines += ["### Federation overhead and network", "",
                  f"Job: sites {', '.join(f['sites'])}; {', '.join(f['job'])}; central evaluation each round. "
                  f"*Direct* = the same training without Flower in one process ({d['threads']} threads): each site "
                  "trains from the global weights with fedmed's `train_epochs`, FedAvg by hand, the coordinator's "
                  "central evaluation each round, site test evaluation at the end. *Deployment* = `fedmed demo` "
                  "(a real `fedmed-server` and one `fedmed-client` process per site, loopback), wall time from launch "
                  "to the written results, start-up included. *Simulation* = `fedmed simulate` (Flower's simulation "
                  "engine, Ray) in the benchmark process.", "",
                  "| run | wall s | ratio to direct | rounds (s) | central test AUC |", "|---|---:|---:|---|---:|",
                  f"| direct | {d['wall_s']:.1f} | 1.00 | training {d['train_s']:.1f} s | {d.get('central_test_auc') or float('nan'):.4f} |"]
        for key in ("deployment", "deployment_fp16", "simulation"):
            if key in f:
                r = f[key]
                lines.append(f"| {key.replace('_', ' ')} | {r['wall_s']:.1f} | {r['wall_s'] / d['wall_s']:.2f} | "
                             f"{', '.join(f'{s:.1f}' for s in r['round_s'])} | {r.get('central_test_auc') or float('nan'):.4f} |")
        for key in ("deployment", "simulation"):
            if key in f:
                r = f[key]
                lines += ["", f"{key.capitalize()}: the slowest site's training summed over rounds (the critical path) "
                          f"was {r['critical_train_s']:.1f} s of the {r['wall_s']:.1f} s wall; the rest "
                          f"({r['wall_s'] - r['critical_train_s']:.1f} s, {1 - r['critical_train_s'] / r['wall_s']:.0%}) is "
                          "start-up, data loading, messaging, aggregation, evaluation and reporting."]
        if "deployment" in f:
            ph = f["deployment"]["phases_s"]
            lines += ["", "Where the deployment's rounds spent their time (summed over rounds, s): " +
                      ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) +
                      "; site training inside those rounds: " +
                      ", ".join(f"{s} {v:.1f}" for s, v in f["deployment"]["site_train_s"].items()) + "."]
        if "simulation" in f:
            e = f["simulation"]["engine"]
            lines += ["", f"Simulation engine start-up ≈ {e['startup_s']:.1f} s of its {e['total_s']:.1f} s; "
                      f"steady round {e['steady_round_s']:.1f} s; peak memory {e['peak_rss_mb']:.0f} MiB."]
        for key in ("network_fp32", "network_fp16"):
            if key in f:
                n = f[key]
                lines += ["", f"{key}: model {n['model_fp32_bytes']:,} bytes fp32; per-reply ratios "
                          + ", ".join(f"{r:.4f}" for r in n["ratios"]) + "."]
        lines.append("")
    if "dp" in res:
        r = res["dp"]
        lines += ["### Privacy cost", "",
                  f"`benchmarks.dp_step`: the production DP path (`fedmed.privacy.make_private`: Opacus "
                  f"GradSampleModule + DPOptimizer, noise multiplier {r['noise_multiplier']:.2f}) vs the plain model, "
                  f"same optimizer and batch ({r['batch']} × {r['size']}px), {r['threads']} thread(s), "
                  f"{r['repeats']} interleaved repeats of {r['steps']} steps; plain {r['plain_s'] * 1000:.1f} ms/step, "
                  f"DP {r['dp_s'] * 1000:.1f} ms/step; CPU-time ratio median {r['cpu_ratio_median']:.2f}. "
                  "Per-sample Conv2d gradients use fedmed's copy-free sampler registered with Opacus "
                  "(`fedmed/dp_conv.py`); clipping, noise and accounting are Opacus'.", ""]
        if "two_threads" in r:
            t = r["two_threads"]
            lines[-2] += (f" With 2 threads: ratio {t['ratio_min']:.2f} / **{t['ratio_median']:.2f}** / {t['ratio_max']:.2f}, "
                          f"CPU-time median {t['cpu_ratio_median']:.2f}.")
    if "scale" in res:
        sc = res["scale"]
        lines += ["### Scale", "",
                  f"`fedmed simulate` over N synthetic sites of {sc['patients_per_site']} patients each "
                  f"({sc['image_size']}px), {sc['rounds']} rounds; {os.cpu_count()} Ray CPUs, 1 per site.", "",
                  "| sites | total s | start-up s | steady round s | peak memory MiB |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['sites']} | {r['total_s']:.1f} | {r['startup_s']:.1f} | {r['steady_round_s']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |" for r in sc["rows"]]
        lines += ["", f"Memory fit: {sc['mem_intercept_mb']:.0f} MiB + {sc['mem_slope_mb_per_site']:.1f} MiB per site.", ""]
    if "data_path" in res:
        r = res["data_path"]
        lines += ["### Data path", "",
                  f"Load a site (decode every DICOM into an empty cache) and pass once over its training loader: "
                  f"{_fmt(r['cold_s'], 2)} s; the same with the filled cache: {_fmt(r['warm_s'], 2)} s. "
                  f"With one training epoch on top (the model dominates): cold {_fmt(r['train_cold_s'], 1)} s, "
                  f"warm {_fmt(r['train_warm_s'], 1)} s, ratio {_fmt(r['train_ratio'])}.", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    # the sections other runs keep between markers (peers, DP cost: benchmarks/peers/report.py) stay
    from benchmarks.peers.report import marked_blocks
    kept = marked_blocks(doc.read_text()) if doc.exists() else []
    doc.write_text("\n".join(lines) + "\n" + "".join(f"\n{b}\n" for b in kept))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    a = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    a.out.mkdir(parents=True, exist_ok=True)
    mach = machine()
    t0 = time.perf_counter()
    res = _run_all(a.out.resolve(), set(a.only))
    total = time.perf_counter() - t0
    (a.out / "results.json").write_text(json.dumps({"machine": mach, "results": res, "total_s": total},
                                                   indent=2, default=float))
    cmd = "make bench   # = python -m benchmarks" + ("" if set(a.only) == set(BENCHES) else f" --only {' '.join(a.only)}")
    write_doc(res, mach, a.doc, command=cmd, total_s=total)
    for row in summary_rows(res):
        print(" | ".join(row))
    print(f"[benchmarks] {total / 60:.1f} min; table in {a.doc}, raw numbers in {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
