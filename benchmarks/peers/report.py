"""The peers' and the DP-cost sections of docs/benchmarks.md, kept between markers.

``python -m benchmarks`` rewrites the rest of that file from its own run; these sections come
from their own runs (the peers need their own venv) and are carried over as they are.
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any

__all__ = ["dp_section", "marked_blocks", "peers_section", "update_doc"]

LABELS = {"fedmed_deployment": "fedmed, deployment (`fedmed demo`, loopback)",
          "fedmed_simulation": "fedmed, simulation (`fedmed simulate`)",
          "flower": "plain Flower app (`flwr run`, simulation engine)",
          "flower_deployment": "plain Flower app, deployment (Flower's SuperLink + SuperNodes, loopback)",
          "nvflare": "NVIDIA FLARE 2.9 (FedAvg recipe, simulator)",
          "fedmed_deployment_same_work": "fedmed, deployment, peers' work (`federation.fraction_evaluate=0 "
                                         "federation.calibration=off`)",
          "fedmed_simulation_same_work": "fedmed, simulation, peers' work (same two settings)"}


def _block(name: str, lines: list[str]) -> str:
    return "\n".join([f"<!-- {name}:begin -->", *lines, f"<!-- {name}:end -->"])


def marked_blocks(text: str) -> list[str]:
    """Every ``<!-- name:begin --> ... <!-- name:end -->`` block in ``text``, in order."""
    return [m.group(0) for m in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", text, flags=re.DOTALL)]


def update_doc(doc: Path, *, peers: dict[str, Any] | None = None, dp: dict[str, Any] | None = None) -> None:
    """Replace (or append) the peers / DP-cost block of ``doc``, leaving the rest as it is."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    # each job has its own block: the synthetic one is "peers", the real-data one "peers_heart"
    peers_block = "peers" if peers is None or _job_name(peers) == "synth" else f"peers_{_job_name(peers)}"
    for name, res, fn in ((peers_block, peers, peers_section), ("dp_cost", dp, dp_section)):
        if res is None:
            continue
        block = _block(name, fn(res))
        pat = re.compile(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", flags=re.DOTALL)
        text = (pat.sub(lambda _, b=block: b, text) if pat.search(text)
                else text.rstrip("\n") + "\n\n" + block + "\n")
    doc.write_text(text)


def _job_name(res: dict[str, Any]) -> str:
    return str(res["job"].get("name", "synth"))  # results saved before jobs had names are the synthetic job


def _job_text(res: dict[str, Any]) -> tuple[str, str, str]:
    """(heading, command, the job's description) of a peers run."""
    job, sites = res["job"], ", ".join(res["sites"])
    if _job_name(res) == "heart":
        return ("## fedmed and its peers on real data: UCI heart disease, four hospitals",
                f"python -m benchmarks.peers.run --job heart --repeats {res['repeats']}   # this table",
                (f"Job: UCI heart disease's four real hospitals ({sites}; `benchmarks.common.heart_cohort`): each "
                 "hospital keeps 75 % of its patients, and the other 25 % of all four, drawn stratified by label "
                 "(seed 0) and pooled, are the coordinator's held-out set, which the real data lacks; "
                 f"{job['rounds']} rounds × {job['local_epochs']} local epochs of configs/heart_disease.yaml's record "
                 "model (a Transformer over the 13 clinical features, no images), seed 0, class-weighted CE, AdamW "
                 "with the cosine-over-rounds rate, FedAvg weighted by training examples; final central test AUC "
                 "on the test split of the held-out set. Training is light here (a few hundred patients per "
                 "hospital), so this job measures mostly what each framework spends around the training."))
    return ("## fedmed and its peers on the same job",
            f"python -m benchmarks.peers.run --repeats {res['repeats']}   # this table",
            (f"Job: fedmed's federation benchmark: sites {sites} of the synthetic cohort, "
             f"{job['rounds']} rounds × {job['local_epochs']} local epochs, {job['image_size']} px, seed 0, the fusion "
             "model, class-weighted CE, AdamW with the cosine-over-rounds rate, FedAvg weighted by training "
             "examples; final central test AUC on the coordinator's held-out set."))


def peers_section(res: dict[str, Any]) -> list[str]:
    s = res["summary"]
    heading, command, job_text = _job_text(res)
    n_sites = len(res["sites"])
    model_bytes = res.get("model_bytes", 1_626_504)  # the synthetic job's model, before runs recorded it
    lines = [heading, "",
             "```bash",
             "make bench-peers-setup   # once: .venv-peers (torch, flwr 1.42, nvflare 2.9, fedmed --no-deps)",
             "make bench-peers         # python -m benchmarks.peers.run with the Makefile's repeats",
             command, "```", "",
             (f"{job_text} The peers import fedmed's model, "
             "data and loss and its training loop (`benchmarks/peers/flower_app/fedmedpeer/task.py`; see the notes), "
             "the rest of each peer is its framework's stock parts. By default fedmed also scores the central set "
             "every round, the sites' test splits in the last round, and temperature-scales the best model on the "
             "sites' val splits (the curves to fit on come with the last round's scoring when the best round is the "
             "last, then one more exchange with every site to measure the result); its *peers' work* rows turn the "
             "last two off. "
             "The Flower app scores the central set every round, FLARE the final model only. All sites train in "
             f"every round, at once (fedmed waits for all {n_sites} before round 1, "
             f"`federation.min_sites={n_sites}`; Ray is given one logical CPU per site, FLARE one thread per "
             "client). One torch "
             f"thread per process everywhere; each run a fresh process tree; {res['repeats']} repeat(s) in rotating "
             "order under one lock; wall = launch to exit (median), memory = peak summed RSS of the run's "
             "processes."), "",
             ("| run | wall s (median) | all walls s | in rounds s / rest s | peak memory MiB | "
              "bytes per site per round | final central test AUC | load before |"),
             "|---|---:|---|---|---:|---:|---|---|"]
    for name, r in s.items():
        sent = "- (in-process)" if r["bytes_per_reply"] is None else f"{r['bytes_per_reply']:,.0f}"
        # one rounds time (or None) per run, beside its wall: equal lengths (benchmarks/peers/run.py)
        split = ", ".join("-" if x is None else f"{x:.1f} / {w - x:.1f}"
                          for x, w in zip(r.get("rounds_all") or [None] * len(r["wall_all"]), r["wall_all"],
                                          strict=True))
        lines.append(f"| {LABELS.get(name, name)} | **{r['wall_s']:.1f}** | "
                     f"{', '.join(f'{w:.1f}' for w in r['wall_all'])} | "
                     f"{split} | "
                     f"{r['peak_rss_mb']:.0f} | {sent} | "
                     f"{', '.join(f'{a:.4f}' for a in r['central_test_auc'])} | "
                     f"{', '.join(map(str, r['load_before']))} |")
    loads = [x for r in s.values() for x in r["load_before"]]
    lines += ["", (f"Load average before the runs: {min(loads):.2f}–{max(loads):.2f} on "
              f"{os.cpu_count()} cores (work outside the benchmark lock shares the machine), so single walls "
              "vary; the ratios below compare medians of the same rotating repeats."),
              "", "Target: fedmed's wall time ≤ each peer's at equal final AUC (± 0.01)."]
    for peer in ("flower", "nvflare", "flower_deployment"):
        if peer not in s:
            continue
        p = s[peer]
        # Flower's deployment runtime is the like-for-like peer of fedmed's deployment only
        mine_runs = [n for n in s if n.startswith("fedmed_") and (peer != "flower_deployment" or "deployment" in n)]
        for mine in mine_runs:
            m = s[mine]
            d_auc = abs(m["central_test_auc"][0] - p["central_test_auc"][0])
            ratio = m["wall_s"] / p["wall_s"]
            ok = ratio <= 1.0 and d_auc <= 0.01
            lines.append(f"- {LABELS[mine].split(' (')[0]} vs {LABELS[peer].split(' (')[0]}: wall ratio "
                         f"**{ratio:.2f}**, |ΔAUC| {d_auc:.4f} → {'met' if ok else '**missed**'}")
    med = {n: (statistics.median(x for x in r["rounds_all"] if x is not None),
               statistics.median(w - x for x, w in zip(r["rounds_all"], r["wall_all"], strict=True) if x is not None))
           for n, r in s.items() if any(x is not None for x in r.get("rounds_all") or [])}
    spread = max(max(r["wall_all"]) - min(r["wall_all"]) for r in s.values())
    if med:
        lines += ["", "Where the wall goes (medians, s in rounds / s outside them): " + "; ".join(
            f"{LABELS[n].split(' (')[0]} {a:.1f} / {b:.1f}" for n, (a, b) in med.items()) + ". Outside the rounds "
            "fedmed starts more (a SuperLink and one SuperNode process per site in the deployment) and does more "
            "after the last round (by default temperature scaling on the sites' val splits; always the report "
            "and its plots, MLflow); inside them it also scores the sites' test splits in the last round by "
            f"default. Walls of one arm differ by up to {spread:.0f} s between repeats here, so the pairs of the "
            "same repeat are worth reading too (the per-repeat walls in the table)."]
    lines += ["", "Notes:",
              ("- *Bytes*: fedmed deployment = the serialised reply objects as each site's guard logs them; "
              "Flower = the serialised arrays of the reply's ArrayRecord; FLARE = its own serializer (fobs) over "
              "the numpy weights it sends. fedmed's simulation passes messages in process (no site guard log). "
              f"All send the full fp32 state dict; the model is {model_bytes:,} bytes fp32."),
              ("- *Memory* sums the resident memory of every process of the run, so a library mapped by several "
              "processes counts once per process (the way `fedmed simulate` reports its own peak)."),
              ("- *Flower*: `flwr run` (1.42) starts a local SuperLink (simulation mode) and by default `uv sync`s "
              "the app's dependencies into a fresh runtime env on every run; the peer venv already holds them, "
              "so that is switched off (`FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`), as fedmed and FLARE "
              "install nothing at run time. The SuperLink it leaves running is ended after each run."
              + (" *Flower, deployment*: the same app on Flower's own deployment runtime "
                 "(`benchmarks/peers/flower_deployment.py`: `flower-superlink` and one `flower-supernode` per site "
                 "on loopback with Flower's default isolation, so every message runs in a fresh `flwr-clientapp` "
                 "process, submitted with `flwr run --stream`), the like-for-like peer of fedmed's deployment; "
                 "opt-in (`--only flower_deployment ...`)." if "flower_deployment" in s else "")),
              ("- *Same computation*: the peers train with fedmed's `train_epochs` because its progress wrapper "
              "(`tqdm.auto`) opens one extra iterator over the loader and so shifts the seeded shuffle; with the "
              "examples' bare loop the same seeds give other batches."
              + (" With it, a 1-round × 1-epoch check gives the same central test AUC (0.7625) in all four runs."
                 if _job_name(res) == "synth" else "")), ""]
    return lines


def dp_section(res: dict[str, Any]) -> list[str]:
    from benchmarks.dp_cost import section

    return section(res)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the sections from saved results (runs/peers/peers.json, runs/dp_cost.json)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md")
    p.add_argument("--peers", type=Path)
    p.add_argument("--dp", type=Path)
    a = p.parse_args(argv)
    update_doc(a.doc, peers=json.loads(a.peers.read_text()) if a.peers else None,
               dp=json.loads(a.dp.read_text()) if a.dp else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
