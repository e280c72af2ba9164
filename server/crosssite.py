"""Cross-site validation (``federation.cross_site``): global and local models at every site.

After the last round the server (1) sends every site the federation's initial weights and
budget (rounds × local epochs); each trains its own local model from that same start and
replies with the weights as its policy allows (:mod:`fedmed.client.crosssite`); (2) sends
each model — the global one and every local one it received — to every site, which scores
it on its own test split and returns metrics only. A ``private`` site's model is scored at
home only (``model = "own"``). Local weights of ``relay`` sites live in the server's memory
for step 2 and are dropped; only ``share`` sites' models are written (``local_models/``).

The result is a matrix, rows = model, columns = site, of test metrics; the report shows it
as a table and a heat map (``cross_site.png``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedmed.checkpoint import save_checkpoint
from fedmed.config import FedmedConfig
from fedmed.messages import (
    CONFIG_KEY,
    CROSS_SITE_ACTION,
    CROSS_SITE_TYPE,
    JOB_KEY,
    record_of,
    reply_site,
    screen_metric_replies,
)
from fedmed.reporting.html import esc, image, save_figure, table
from fedmed.transfer import pack, unpack

__all__ = ["cross_site_validation", "cross_site_html", "plot_matrix", "SHOWN"]

log = logging.getLogger("fedmed.server")
Send = Callable[[list[Message]], list[Message]]
SHOWN = "auc"
_POLICY = {0: "private", 1: "relay", 2: "share"}


def _messages(nodes: list[int], arrays: dict[str, np.ndarray], config: dict[str, Any]) -> list[Message]:
    return [Message(content=RecordDict({"arrays": pack(arrays), CONFIG_KEY: ConfigRecord(config)}),
                    message_type=CROSS_SITE_TYPE, dst_node_id=n) for n in nodes]


def cross_site_validation(send: Send, nodes: list[int], *, cfg: FedmedConfig, init: dict[str, np.ndarray],
                          final: dict[str, np.ndarray], job: str, federation_id: str, out_dir: Path) -> dict[str, Any]:
    """Run both steps; returns ``{"sites", "models", "matrix": {model: {site: metrics}}, "policy",
    "kept", "failed"}``. Never raises for a site's failure (it is listed in ``failed``)."""
    fed = cfg.federation
    base = {JOB_KEY: job, "federation-id": federation_id}
    failed: dict[str, str] = {}
    replies = send(_messages(nodes, init, {**base, CROSS_SITE_ACTION: "train", "epochs": fed.rounds * fed.local_epochs,
                                           "lr": float(cfg.train.lr)}))
    site_node = {reply_site(m): int(m.metadata.src_node_id) for m in replies}
    trained, train_failed = screen_metric_replies(replies)
    failed.update({s: f"local training: {r}" for s, r in train_failed.items()})
    local: dict[str, dict[str, np.ndarray]] = {}
    policy: dict[str, str] = {}
    kept: list[str] = []
    for msg in replies:
        site = reply_site(msg)
        if site not in trained:
            continue
        policy[site] = _POLICY.get(int(trained[site].get("local-model-policy", 0)), "private")
        if policy[site] == "private" or "arrays" not in msg.content:
            continue
        try:
            local[site] = unpack(record_of(msg, "arrays", ArrayRecord), init)
        except Exception as exc:  # noqa: BLE001 - a malformed model is one site's failure
            failed[site] = f"local model unusable ({type(exc).__name__})"
            continue
        if not all(np.isfinite(v).all() for v in local[site].values() if np.issubdtype(v.dtype, np.floating)):
            failed[site] = "local model has NaN or Inf"
            del local[site]
            continue
        if policy[site] == "share":
            save_checkpoint(out_dir / "local_models" / f"{site}.pt", weights=local[site], config=cfg,
                            meta={"local_model_of": site})
            kept.append(site)
    sites = sorted(trained)
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    models = ["global", *sorted(trained)]
    for name in models:
        if name == "global" or name in local:
            weights, targets, which = (final if name == "global" else local[name]), [site_node[s] for s in sites], name
        else:  # private: only its own site scores it
            weights, targets, which = final, [site_node[name]], "own"
        got = send(_messages(targets, weights, {**base, CROSS_SITE_ACTION: "score", "model": which}))
        scores, bad = screen_metric_replies(got)
        failed.update({f"{name} at {s}": r for s, r in bad.items()})
        matrix[name] = {s: {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
                        for s, m in scores.items()}
    local.clear()  # relay: the server keeps no local model once scored
    log.info("cross-site validation: %d model(s) x %d site(s); kept %s; %d failure(s)", len(models), len(sites),
             kept or "none", len(failed))
    result = {"sites": sites, "models": models, "matrix": matrix, "policy": policy, "kept": kept, "failed": failed,
              "budget_epochs": fed.rounds * fed.local_epochs}
    plot_matrix(result, path=out_dir / "cross_site.png")
    return result


def _grid(result: dict[str, Any], key: str) -> np.ndarray:
    return np.array([[result["matrix"].get(m, {}).get(s, {}).get(key, np.nan) for s in result["sites"]]
                     for m in result["models"]], dtype=float)


def plot_matrix(result: dict[str, Any], *, path: Path, key: str = SHOWN) -> Path:
    """Heat map of ``key`` (rows: model, columns: site); empty cells are blank."""
    from matplotlib.figure import Figure

    grid = _grid(result, key)
    fig = Figure(figsize=(1.6 + 1.1 * len(result["sites"]), 1.2 + 0.55 * len(result["models"])))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0,
                   vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1, aspect="auto")
    ax.set_xticks(range(len(result["sites"])), result["sites"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(result["models"])), [f"{m} model" for m in result["models"]], fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if math.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xlabel("evaluated at (test split)")
    ax.set_title(f"cross-site {key}", fontsize=10)
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def cross_site_html(result: dict[str, Any]) -> str:
    """The report's section: the matrix of AUC and balanced accuracy, the policies, the heat map."""
    e = esc
    parts = [f"<h2>Cross-site validation</h2><p>Each site trained a local model from the federation's initial "
             f"weights for {result['budget_epochs']} epoch(s) (the federation's rounds × local epochs); every model "
             "was scored on every site's test split, metrics only. Local models: "
             + e(", ".join(f"{s}: {p}" for s, p in sorted(result["policy"].items())))
             + f"; kept by the server: {e(', '.join(result['kept']) or 'none')}.</p>"]
    for key in ("auc", "balanced_accuracy"):
        grid = _grid(result, key)
        rows = [[f"{m} model", *(f"{v:.4f}" if math.isfinite(v) else "-" for v in grid[i])]
                for i, m in enumerate(result["models"])]
        parts.append(f"<h3>{e(key)}</h3>" + table(["model \\ site", *result["sites"]], rows))
    parts.append(image("cross_site.png", "cross-site heat map"))
    if result["failed"]:
        parts.append("<ul>" + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in result["failed"].items()) + "</ul>")
    return "".join(parts)
