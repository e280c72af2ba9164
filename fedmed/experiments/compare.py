"""``fedmed compare``: is federating worth it? Local-only vs pooled vs federated, several seeds.

For each seed it trains, with the same model and the same epoch budget
(``federation.rounds × federation.local_epochs``):

- **local-only** at each site (:func:`fedmed.experiments.local.train_local` on that site alone);
- **pooled** centralised training on the union of the sites' training splits;
- each **strategy** through :func:`fedmed.experiments.simulate.simulate` (the deployment's apps).

Every model is scored on every site's test split and on the pooled test set (the union of
the site test splits). Splits depend only on ``data.split_seed``, so all methods see the
same test patients; the federated runs' own per-site evaluation is re-computed here and the
difference is reported as a check. Writes ``comparison.md``, ``comparison.csv``,
``comparison_runs.csv``, ``comparison.png`` and one MLflow run.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedmed.config import FedmedConfig
from fedmed.data.dataset import SiteDataset, SiteSplits, train_transform
from fedmed.data.records import RecordEncoder
from fedmed.data.site import combine_sites
from fedmed.task import SiteBundle, load_site_bundle, model_from_config

if TYPE_CHECKING:
    from fedmed.server.checkpoint import FederationState

__all__ = ["compare", "federated_checkpoint", "markdown_table", "pooled_bundle", "evaluate_on_sites", "summarise",
           "METRICS"]

METRICS = {  # key -> (column title, higher is better)
    "mean_acc": "mean site acc",
    "mean_bacc": "mean site bal. acc",
    "worst_acc": "worst site acc",
    "worst_bacc": "worst site bal. acc",
    "pooled_acc": "pooled-test acc",
    "pooled_auc": "pooled-test AUC",
}
PREDS = dict[str, tuple[np.ndarray, np.ndarray]]  # site -> (labels, probabilities)


def pooled_bundle(cfg: FedmedConfig, bundles: dict[str, SiteBundle]) -> SiteBundle:
    """The pooled training set built from each site's OWN train/val/test patients.

    Splitting the pool afresh would put some of a site's test patients into training; here
    the pooled splits are exactly the union of the site splits. The record encoder is fitted
    on the pooled training patients.
    """
    sites = [b.site for b in bundles.values()]
    pooled = combine_sites(sites)
    offsets = np.cumsum([0] + [len(s.samples) for s in sites])[:-1]
    idx = {k: np.concatenate([off + b.splits.indices[k] for off, b in zip(offsets, bundles.values(), strict=True)])
           for k in ("train", "val", "test")}
    samples = pooled.samples
    train_ids = samples.iloc[idx["train"]].query("has_record")["patient_id"].unique()
    encoder = RecordEncoder(numeric=cfg.data.numeric, categorical=cfg.data.categorical,
                            imputation=cfg.data.imputation)
    encoder.fit(pooled.records.loc[list(train_ids)])
    first = next(iter(bundles.values())).splits.train
    sets = {k: SiteDataset(samples.iloc[pos], pooled.records, encoder=encoder, spec=first.spec,
                           cache=first.cache, notes_column=cfg.data.notes_column,
                           transform=train_transform(cfg.data) if k == "train" else None)
            for k, pos in idx.items()}
    splits = SiteSplits(train=sets["train"], val=sets["val"], test=sets["test"], encoder=encoder,
                        indices=idx, summary=pooled.summary)
    return SiteBundle(name="pooled", site=pooled, splits=splits, n_classes=len(cfg.data.classes),
                      pool="site-splits")


def _test_set(bundle: SiteBundle, encoder: RecordEncoder | None, cfg: FedmedConfig) -> SiteDataset:
    """A site's test split, encoded by ``encoder`` (None: the site's own, as the ClientApp does)."""
    test = bundle.splits.test
    if encoder is None:
        return test
    ds = SiteDataset(bundle.site.samples.iloc[bundle.splits.indices["test"]], bundle.site.records,
                     encoder=encoder, spec=test.spec, cache=test.cache)
    ds.notes = test.notes
    return ds


@torch.no_grad()
def evaluate_on_sites(model: torch.nn.Module, bundles: dict[str, SiteBundle], *, cfg: FedmedConfig,
                      encoder: RecordEncoder | None = None, device: torch.device | None = None) -> PREDS:
    """Labels and probabilities of ``model`` on every site's test split."""
    from fedmed.train.loop import forward_pass

    device = device or next(model.parameters()).device
    out: PREDS = {}
    for name, b in bundles.items():
        loader = DataLoader(_test_set(b, encoder, cfg), batch_size=cfg.train.batch_size * 2)
        scored = forward_pass(model, loader, device=device, amp=cfg.train.amp)
        out[name] = (scored.labels, scored.probabilities(multilabel=cfg.model.multilabel))
    return out


def summarise(preds: PREDS, *, n_classes: int) -> dict[str, Any]:
    """Mean and worst per-site accuracy / balanced accuracy, and pooled-test metrics."""
    from fedmed.metrics import compute_metrics

    per = {s: compute_metrics(y, p, n_classes=n_classes) for s, (y, p) in preds.items()}
    pooled = compute_metrics(np.concatenate([y for y, _ in preds.values()]),
                             np.concatenate([p for _, p in preds.values()]), n_classes=n_classes)
    acc = [m["accuracy"] for m in per.values()]
    bacc = [m["balanced_accuracy"] for m in per.values()]
    return {"mean_acc": float(np.mean(acc)), "mean_bacc": float(np.mean(bacc)),
            "worst_acc": float(np.min(acc)), "worst_bacc": float(np.min(bacc)),
            "pooled_acc": pooled["accuracy"], "pooled_auc": pooled["auc"],
            "per_site": {s: {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                             "auc": m["auc"], "n": m["n"]} for s, m in per.items()}}


def _load(cfg: FedmedConfig, path: Path, device: torch.device) -> torch.nn.Module:
    model = model_from_config(cfg).to(device)
    state = torch.load(path, map_location=device, weights_only=False)["model"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    return model.eval()


def _with(cfg: FedmedConfig, **sections: Any) -> FedmedConfig:
    """``cfg`` with sections updated (a dict) or replaced (any other value, e.g. ``name``)."""
    raw = cfg.model_dump(mode="json")
    for sec, values in sections.items():
        if isinstance(values, dict):
            raw[sec].update(values)
        else:
            raw[sec] = values
    return FedmedConfig.model_validate(raw)


def federated_checkpoint(state: FederationState, run_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    """The model a federated row scores, and that round's history row (the sites' own scores).

    The round ``train.monitor`` picked on validation (``best_model.pt``), as pooled and local rows
    use their best epoch and the server's own final evaluation does; the last round only when no
    round was judged (no validation data), never a round picked on a test split.
    """
    from fedmed.server.checkpoint import final_model

    path = final_model(run_dir) or run_dir / "last_model.pt"
    if path.name == "best_model.pt" and state.best_round > 0:
        kept = [h for h in state.history if h.get("round") == state.best_round]
        return path, (kept[-1] if kept else None)
    return path, (state.history[-1] if state.history else None)


def _mean_std(vals: list[float]) -> tuple[float, float]:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def compare(
    cfg: FedmedConfig,
    *,
    seeds: list[int],
    strategies: list[str],
    out_dir: Path,
    sites: list[str] | None = None,
    proximal_mu: float = 0.01,
    num_cpus_per_site: int = 1,
    total_cpus: int | None = None,
    skip_local: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the comparison and write its tables, plot and MLflow run; returns the results.

    ``proximal_mu`` is used for ``fedprox`` when the config's ``federation.proximal_mu`` is 0.
    ``total_cpus`` caps the CPUs Ray may use (default: all), e.g. 1 on a shared machine.
    ``resume`` continues each federation that an earlier, interrupted compare into ``out_dir``
    left checkpointed (a finished one runs no further rounds); local and pooled rows retrain.
    """
    from fedmed.device import select_device
    from fedmed.experiments.local import train_local
    from fedmed.experiments.simulate import federation_sites, simulate

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = federation_sites(cfg, sites)
    names = list(dirs)
    budget = cfg.federation.rounds * cfg.federation.local_epochs
    cfg = _with(cfg, data={"sites": names}, train={"progress": False})
    device = select_device(cfg.train.device)
    n_classes = len(cfg.data.classes)
    bundles = {s: load_site_bundle(cfg, site_dir=p, progress=False) for s, p in dirs.items()}
    pooled = pooled_bundle(cfg, bundles)
    split_info = {s: {k: int(len(v)) for k, v in b.splits.indices.items()} for s, b in bundles.items()}
    uri = f"sqlite:///{out_dir}/mlflow.db"
    runs: list[dict[str, Any]] = []  # one row per (seed, method)
    checks: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {}

    def record(seed: int, method: str, preds: PREDS, seconds: float) -> dict[str, Any]:
        row = {"seed": seed, "method": method, "seconds": round(seconds, 1), **summarise(preds, n_classes=n_classes)}
        runs.append(row)
        timings.setdefault(method, []).append(seconds)
        print(f"compare: seed {seed} {method:<22} mean acc {row['mean_acc']:.3f}  mean bAcc "
              f"{row['mean_bacc']:.3f}  worst acc {row['worst_acc']:.3f}  pooled AUC {row['pooled_auc']:.3f}"
              f"  ({seconds:.0f}s)", flush=True)
        return row

    for seed in seeds:
        sdir = out_dir / f"seed{seed}"
        local_cfg = _with(cfg, train={"seed": seed, "epochs": budget})
        if not skip_local:
            own: PREDS = {}
            for s in names:
                t0 = time.perf_counter()
                res = train_local(local_cfg, bundle=bundles[s], out_dir=sdir / f"local-{s}")
                model = _load(local_cfg, res["out_dir"] / "model.pt", device)
                preds = evaluate_on_sites(model, bundles, cfg=cfg, encoder=bundles[s].splits.encoder)
                own[s] = preds[s]
                record(seed, f"local ({s})", preds, time.perf_counter() - t0)
            runs.append({"seed": seed, "method": "local (own site)", "seconds": 0.0,
                         **summarise(own, n_classes=n_classes)})
            t0 = time.perf_counter()
            res = train_local(local_cfg, bundle=pooled, out_dir=sdir / "pooled")
            model = _load(local_cfg, res["out_dir"] / "model.pt", device)
            record(seed, "pooled", evaluate_on_sites(model, bundles, cfg=cfg, encoder=pooled.splits.encoder),
                   time.perf_counter() - t0)
        for strategy in strategies:
            fed = {"strategy": strategy, "min_sites": min(cfg.federation.min_sites, len(names))}
            if strategy == "fedprox" and cfg.federation.proximal_mu <= 0:
                fed["proximal_mu"] = proximal_mu
            scfg = _with(cfg, name=f"{cfg.name}-{strategy}-seed{seed}", train={"seed": seed}, federation=fed)
            t0 = time.perf_counter()
            state = simulate(scfg, sites=names, out_dir=sdir / strategy, mlflow_uri=uri,
                             num_cpus_per_site=num_cpus_per_site, total_cpus=total_cpus,
                             resume=resume and (sdir / strategy / "state.pkl").exists())
            path, scored = federated_checkpoint(state, sdir / strategy)
            model = _load(scfg, path, device)
            preds = evaluate_on_sites(model, bundles, cfg=cfg)
            row = record(seed, strategy, preds, time.perf_counter() - t0)
            fed_sites = (scored.get("per_site") or {}) if scored else {}
            for s, m in fed_sites.items():
                checks.append({"seed": seed, "strategy": strategy, "site": s,
                               "n_fed": int(m.get("num-examples", -1)), "n_here": row["per_site"][s]["n"],
                               "acc_diff": abs(float(m["accuracy"]) - row["per_site"][s]["accuracy"])})

    results = _aggregate(runs, names)
    _write(results, runs, checks, out_dir=out_dir, cfg=cfg, seeds=seeds, strategies=strategies,
           budget=budget, split_info=split_info, timings=timings, table_fn=markdown_table)
    _log_mlflow(results, cfg=cfg, uri=uri, out_dir=out_dir, seeds=seeds, strategies=strategies)
    return {"results": results, "runs": runs, "checks": checks, "out_dir": out_dir}


def _aggregate(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        out[m] = {k: _mean_std([r[k] for r in rows]) for k in METRICS}
        out[m]["per_site"] = {s: _mean_std([r["per_site"][s]["accuracy"] for r in rows]) for s in names}
        out[m]["n_seeds"] = len(rows)
    centres = [m for m in methods if m.startswith("local (") and m[7:-1] in names]
    if centres:
        # Each hospital alone, averaged over hospitals (per seed, then over seeds).
        seeds = sorted({r["seed"] for r in runs})
        per_seed = {k: [float(np.mean([r[k] for r in runs if r["seed"] == sd and r["method"] in centres]))
                        for sd in seeds] for k in METRICS}
        out["local (mean of centres)"] = {k: _mean_std(v) for k, v in per_seed.items()}
        out["local (mean of centres)"]["per_site"] = {
            s: _mean_std([float(np.mean([r["per_site"][s]["accuracy"] for r in runs
                                         if r["seed"] == sd and r["method"] in centres])) for sd in seeds])
            for s in names}
        out["local (mean of centres)"]["n_seeds"] = len(seeds)
        best = max(centres, key=lambda m: out[m]["mean_bacc"][0])
        out[f"best local centre = {best[7:-1]}"] = out[best]
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + " |"  # noqa: E731
    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def _fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "–" if not math.isfinite(m) else f"{m:.3f} ± {s:.3f}"


def _order(results: dict[str, Any], strategies: list[str]) -> list[str]:
    head = [m for m in results if m.startswith("local (") and m not in ("local (own site)", "local (mean of centres)")]
    tail: list[str] = [m for m in ("local (own site)", "local (mean of centres)") if m in results]
    tail += [m for m in results if m.startswith("best local")] + [m for m in ["pooled", *strategies] if m in results]
    return head + tail


def _write(results: dict[str, Any], runs: list[dict[str, Any]], checks: list[dict[str, Any]], *,
           out_dir: Path, cfg: FedmedConfig, seeds: list[int], strategies: list[str], budget: int,
           split_info: dict[str, Any], timings: dict[str, list[float]], table_fn: Any) -> None:
    order = _order(results, strategies)
    names = list(split_info)
    header = ["method", *METRICS.values()]
    rows = [[m, *(_fmt(results[m][k]) for k in METRICS)] for m in order]
    site_rows = [[m, *(_fmt(results[m]["per_site"][s]) for s in names)] for m in order]
    split_rows = [[s, *(str(split_info[s][k]) for k in ("train", "val", "test"))] for s in names]
    worst = max((c["acc_diff"] for c in checks), default=float("nan"))
    n_ok = all(c["n_fed"] == c["n_here"] for c in checks)
    lines = [
        f"# fedmed compare: {cfg.name}", "",
        f"Sites: {', '.join(names)}. Seeds: {', '.join(map(str, seeds))}. Epoch budget: "
        f"{budget} ({cfg.federation.rounds} rounds × {cfg.federation.local_epochs} local epochs; "
        f"local-only and pooled train up to {budget} epochs with early stopping on their validation "
        f"split, patience {cfg.train.patience}). Federated models: the round with the best validation "
        f"{cfg.train.monitor} (`best_model.pt`; central val set, else the sites' val splits).",
        f"Mean ± sample std over {len(seeds)} seed(s). Per-site metrics are on each site's test split; "
        "pooled-test = the union of the site test splits.", "",
        table_fn(header, rows), "", "## Per-site test accuracy", "", table_fn(["method", *names], site_rows), "",
        "## Splits (patients per split; identical for every method)", "",
        table_fn(["site", "train", "val", "test"], split_rows), "",
        f"Split check: the federated runs' own per-site evaluation (ClientApp) used the same test sizes: "
        f"{'yes' if n_ok else 'NO'}; largest accuracy difference to the re-evaluation here: {worst:.2g}.",
        "", "Mean seconds per run: " + ", ".join(f"{m} {np.mean(v):.0f}s" for m, v in timings.items()), "",
        "![comparison](comparison.png)", "",
    ]
    (out_dir / "comparison.md").write_text("\n".join(lines))
    with open(out_dir / "comparison.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "n_seeds", *(f"{k}_{s}" for k in METRICS for s in ("mean", "std")),
                    *(f"acc_{s}_mean" for s in names)])
        for m in order:
            r = results[m]
            w.writerow([m, r["n_seeds"], *(f"{v:.4f}" for k in METRICS for v in r[k]),
                        *(f"{r['per_site'][s][0]:.4f}" for s in names)])
    with open(out_dir / "comparison_runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seed", "method", "seconds", *METRICS, *(f"acc_{s}" for s in names)])
        for r in runs:
            w.writerow([r["seed"], r["method"], r["seconds"], *(f"{r[k]:.4f}" for k in METRICS),
                        *(f"{r['per_site'][s]['accuracy']:.4f}" for s in names)])
    (out_dir / "comparison.json").write_text(json.dumps(
        {"results": results, "runs": runs, "checks": checks, "splits": split_info}, indent=2, default=float))
    _plot(results, [m for m in order if not (m.startswith("local (") and m[7:-1] in names)],
          out_dir / "comparison.png", title=cfg.name)


def _plot(results: dict[str, Any], methods: list[str], path: Path, *, title: str) -> None:
    from matplotlib.figure import Figure

    from fedmed.reporting.html import save_figure

    keys = ["mean_acc", "mean_bacc", "worst_acc", "pooled_auc"]
    x = np.arange(len(methods))
    width = 0.8 / len(keys)
    fig = Figure(figsize=(max(6.0, 1.3 * len(methods)), 4.0))
    ax = fig.subplots()
    for i, k in enumerate(keys):
        means = [results[m][k][0] for m in methods]
        stds = [results[m][k][1] for m in methods]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=METRICS[k])
    ax.set_xticks(x, methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: mean ± std over seeds")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, dpi=120)


def _log_mlflow(results: dict[str, Any], *, cfg: FedmedConfig, uri: str, out_dir: Path,
                seeds: list[int], strategies: list[str]) -> None:
    from fedmed.server.tracking import Tracker

    tracker = Tracker(uri=uri, experiment=cfg.tracking.experiment, run_name=f"{cfg.name}-compare",
                      out_dir=out_dir)
    tracker.start()
    tracker.log_params({**cfg.model_dump(mode="json"),
                        "compare": {"seeds": seeds, "strategies": strategies}})
    flat: dict[str, Any] = {"round": 0}
    for m, r in results.items():
        for k in METRICS:
            flat[f"{m}.{k}"], flat[f"{m}.{k}_std"] = r[k]
    tracker.log_round(flat)
    tracker.log_artifacts([out_dir / n for n in ("comparison.md", "comparison.csv", "comparison_runs.csv",
                                                 "comparison.png")])
    tracker.end("FINISHED")
