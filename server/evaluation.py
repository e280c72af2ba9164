"""``fedmed-server --evaluate MODEL``: a saved model scored at every connected site, no training.

One message of type ``evaluate.external`` (:data:`fedmed.messages.EXTERNAL_EVAL_TYPE`) goes
to each site with the weights, the job, the split, the model's fitted temperature and the
number of bootstrap replicates. Each site answers (through its guard) with numbers only:
per metric the value, its patient-level bootstrap standard error and 95 % interval. The
pooled view is the example-weighted mean of the sites' values with a normal interval from
their standard errors (:func:`fedmed.bootstrap.combine_site_intervals`) — not the metric of
the pooled predictions, which would need rows the server never sees.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedmed.bootstrap import combine_site_intervals
from fedmed.checkpoint import Checkpoint
from fedmed.config import FedmedConfig
from fedmed.messages import (
    CONFIG_KEY,
    EXTERNAL_EVAL_TYPE,
    JOB_KEY,
    encode_job,
    screen_metric_replies,
)
from fedmed.metrics import SCALAR_METRICS
from fedmed.reporting.html import esc, write_page
from fedmed.transfer import pack

__all__ = ["evaluate_federation", "site_result"]

log = logging.getLogger("fedmed.server")


def site_result(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's flat reply → ``{"n_samples", "n_patients", "metrics": {m: {value, lo, hi, se}}}``."""
    nan = float("nan")
    out = {k: {"value": float(metrics[k]), "lo": float(metrics.get(f"{k}_lo", nan)),
               "hi": float(metrics.get(f"{k}_hi", nan)), "se": float(metrics.get(f"{k}_se", nan))}
           for k in SCALAR_METRICS if isinstance(metrics.get(k), (int, float))}
    return {"n_samples": int(metrics.get("num-examples", 0)), "n_patients": int(metrics.get("num-patients", 0)),
            "metrics": out}


def evaluate_federation(grid: Any, cfg: FedmedConfig, ckpt: Checkpoint, *, out_dir: Path, split: str = "test",
                        n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Send the model to every connected site, collect metrics, write ``evaluation.json/html``.

    ``cfg`` gives ``federation.min_sites`` and ``round_timeout``; the model's own config (in
    ``ckpt``) is the job the sites rebuild. Sites that fail or do not answer are listed.
    Raises ``TimeoutError`` when fewer than ``min_sites`` connect.
    """
    from fedmed.server.federation import (
        _wait_for_sites,
        job_for_sites,
        send_and_receive,
    )

    fed = cfg.federation
    connected = _wait_for_sites(grid, fed.min_sites, fed.round_timeout)
    nodes = sorted(grid.get_node_ids())
    job = encode_job(job_for_sites(ckpt.config))
    config = ConfigRecord({JOB_KEY: job, "split": split, "temperature": ckpt.calibrated_temperature,
                           "n-boot": int(n_boot), "seed": int(seed),
                           # a local model's fitted record encoder is part of the model; federated
                           # models have none (each site uses its own patients' statistics)
                           "record-encoder": json.dumps(ckpt.encoder) if ckpt.encoder is not None else ""})
    arrays = pack({k: v.numpy() for k, v in ckpt.weights.items()})
    msgs = [Message(content=RecordDict({"arrays": arrays, CONFIG_KEY: config}), message_type=EXTERNAL_EVAL_TYPE,
                    dst_node_id=n) for n in nodes]
    replies = send_and_receive(grid, msgs, timeout=fed.round_timeout)
    per_site, failed = screen_metric_replies(replies)
    answered = {int(m.metadata.src_node_id) for m in replies}
    failed.update({f"node-{n}": "no reply within the round timeout" for n in nodes if n not in answered})
    sites = {s: site_result(m) for s, m in sorted(per_site.items())}
    pooled = combine_site_intervals({s: m for s, m in per_site.items() if m.get("num-examples", 0)})
    result = {
        "model": ckpt.path.name, "round": ckpt.meta.get("round"), "classes": ckpt.classes,
        "temperature": ckpt.calibrated_temperature, "temperature_fitted": ckpt.temperature is not None,
        "split": split, "sites_connected": connected, "sites_failed": failed,
        "bootstrap": {"replicates": n_boot, "seed": seed, "level": 0.95, "unit": "patient",
                      "pooled": "example-weighted mean of the sites' values, normal interval from their "
                                "bootstrap standard errors"},
        "sites": sites,
        "pooled": {"n_samples": sum(r["n_samples"] for r in sites.values()),
                   "n_patients": sum(r["n_patients"] for r in sites.values()), "metrics": pooled},
    }
    _write(result, out_dir)
    log.info("evaluated %s at %d site(s) (%d failed); pooled AUC %s", ckpt.path.name, len(sites), len(failed),
             pooled.get("auc", {}).get("value"))
    return result


def _write(result: dict[str, Any], out_dir: Path) -> None:
    from fedmed.evaluate import metrics_table

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=float))
    e = esc
    failed = "".join(f"<li>{e(s)}: {e(r)}</li>" for s, r in result["sites_failed"].items()) or "<li>none</li>"
    write_page(out_dir / "evaluation.html", "federated evaluation", [
        f"<p>No training: each site scored the model on its {e(result['split'])} split with T = "
        f"{result['temperature']:.3f} and sent metrics only, each with a {result['bootstrap']['replicates']}-"
        "replicate patient-level bootstrap 95 % interval. Pooled: example-weighted mean of the sites, normal "
        f"interval from their bootstrap standard errors.</p><pre>{e(metrics_table(result))}</pre>",
        f"<h2>Sites that failed</h2><ul>{failed}</ul>",
    ], heading=f"Federated evaluation of {result['model']}")
