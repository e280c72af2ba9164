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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        size, stages = pretrained.recipe()  # the resolution and fine-tuning of the HAM10000 results
        steps["pretrained"] = lambda: pretrained.measure(size=size, batch=32, threads=1, trainable_stages=stages)
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
        rows.append(("Trainer efficiency (fedmed samples/s ÷ minimal loop)", _fmt(r), "≥ 0.95",
                     _mark(r["median"] >= 0.95)))
    if "federation" in res:
        from benchmarks import federation
        rows += federation.summary_rows(res["federation"])
    if "dp" in res:
        r = res["dp"]
        s = {"min": r["ratio_min"], "median": r["ratio_median"], "max": r["ratio_max"]}
        rows.append(("Privacy cost (DP-SGD step ÷ plain step, fusion model)", _fmt(s), "≤ 1.5",
                     _mark(s["median"] <= 1.5)))
    if "pretrained" in res:
        r = res["pretrained"]
        rows.append((f"Pretrained EfficientNet-Lite0, {r['size']} px: fine-tuning images/s ({r['device']})",
                     _fmt(r["finetune_images_per_s"], 1), "report", "-"))
        if "partial_images_per_s" in r:
            rows.append((f"Pretrained EfficientNet-Lite0, {r['size']} px, last {r['trainable_stages']} stages "
                         f"fine-tuned (the results' recipe): images/s", _fmt(r["partial_images_per_s"], 1),
                         "report", "-"))
        if "dp_frozen" in r:
            d = r["dp_frozen"]
            s = {"min": d["ratio_min"], "median": d["ratio_median"], "max": d["ratio_max"]}
            rows.append(("Privacy cost, pretrained frozen backbone (DP step ÷ plain step)", _fmt(s), "≤ 2.0",
                         _mark(s["median"] <= 2.0)))
    if "scale" in res:
        from benchmarks import scale
        rows += scale.summary_rows(res["scale"])
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
                  f"alternating; {t['threads']} thread(s) on {t['device']}. "
                  f"Samples/s: fedmed {_fmt(t['fedmed_samples_per_s'], 1)}, "
                  f"minimal {_fmt(t['minimal_samples_per_s'], 1)}; "
                  f"samples per CPU-second ratio {_fmt(t['cpu_ratio'])}.", ""]
    if "federation" in res:
        from benchmarks import federation
        lines += federation.doc_lines(res["federation"])
    if "dp" in res:
        r = res["dp"]
        lines += ["### Privacy cost", "",
                  f"`benchmarks.dp_step`: the production DP path (`fedmed.privacy.make_private`: Opacus "
                  f"GradSampleModule + DPOptimizer, noise multiplier {r['noise_multiplier']:.2f}) vs the plain model, "
                  f"same optimizer and batch ({r['batch']} × {r['size']}px), {r['threads']} thread(s), "
                  f"{r['repeats']} interleaved repeats of {r['steps']} steps; plain {r['plain_s'] * 1000:.1f} ms/step, "
                  f"DP {r['dp_s'] * 1000:.1f} ms/step; CPU-time ratio median {r['cpu_ratio_median']:.2f}. "
                  "Per-sample Conv2d and GroupNorm gradients use fedmed's grad samplers registered with Opacus "
                  "(a grouped convolution-backward call; GroupNorm in cache-sized chunks) and the convolutions' "
                  "batch weight gradients, which DP replaces, are not computed (`fedmed/dp_conv.py`); clipping, "
                  "noise and accounting are Opacus'.", ""]
        if "two_threads" in r:
            t = r["two_threads"]
            lines[-2] += (f" With 2 threads: ratio {t['ratio_min']:.2f} / **{t['ratio_median']:.2f}** / "
                          f"{t['ratio_max']:.2f}, CPU-time median {t['cpu_ratio_median']:.2f}.")
    if "scale" in res:
        from benchmarks import scale
        lines += scale.doc_lines(res["scale"])
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
    for name in res:  # each benchmark's own machine state (load average) beside its numbers
        res[name].setdefault("machine", mach)
    kept = {}
    if set(a.only) != set(BENCHES) and (a.out / "results.json").exists():  # --only: keep the others' numbers
        kept = {k: v for k, v in json.loads((a.out / "results.json").read_text()).get("results", {}).items()
                if k not in res}
    (a.out / "results.json").write_text(json.dumps({"machine": mach, "results": {**kept, **res}, "total_s": total},
                                                   indent=2, default=float))
    cmd = "make bench   # = python -m benchmarks" + (
        "" if set(a.only) == set(BENCHES) else f" --only {' '.join(a.only)}")
    old_doc = a.doc.read_text() if a.doc.exists() else ""
    write_doc(res, mach, a.doc, command=cmd, total_s=total)
    if set(a.only) != set(BENCHES):  # keep the page's rows and sections of the benchmarks not run
        from benchmarks.doc_merge import merge
        a.doc.write_text(merge(old_doc, a.doc.read_text(), ran=set(a.only)))
    for row in summary_rows(res):
        print(" | ".join(row))
    print(f"[benchmarks] {total / 60:.1f} min; table in {a.doc}, raw numbers in {a.out / 'results.json'}")
    match = res.get("federation", {}).get("auc_match")
    if match and not match["ok"]:  # the direct baseline must compute what the federation computes
        print(f"[benchmarks] FAILED: direct, deployment and simulation end at different AUCs: {match}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
