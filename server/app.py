"""The coordinator's Flower ServerApp: run the federation, track it, report it.

Thin glue: settings come from the resolved config file named in the run config
(``fedmed-config``), written by ``fedmed-server`` or ``fedmed simulate``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Literal

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.config import FedmedConfig
from fedmed.server.calibration import calibration_summary
from fedmed.server.central import make_central_eval
from fedmed.server.crosssite import cross_site_html
from fedmed.server.federation import run_federation
from fedmed.server.flower_compat import shorten_reply_pulls
from fedmed.server.personalize import personalization_html, personalization_summary
from fedmed.server.report import site_problems, summary_table, write_report
from fedmed.server.tracking import BackgroundTracker, Tracker

__all__ = ["app", "run"]

log = logging.getLogger("fedmed.server")
app = ServerApp()


def run(grid: Grid, run_config: dict) -> Path:
    """Run the federation described by ``run_config``; returns its output folder."""
    cfg = FedmedConfig.model_validate_json(Path(str(run_config["fedmed-config"])).read_text())
    out = Path(str(run_config["out-dir"]))
    resume = bool(run_config.get("resume", False))
    inline = Tracker(
        uri=str(run_config.get("mlflow-uri") or "") or cfg.tracking.mlflow_uri,
        experiment=cfg.tracking.experiment, run_name=cfg.name, out_dir=out, resume=resume)
    tracker: Tracker | BackgroundTracker = inline
    if os.environ.get("FEDMED_TRACKING_INLINE") != "1":  # "1": on the rounds' path (benchmarks compare)
        tracker = BackgroundTracker(inline, hold=True)  # MLflow starts once round 1 is out, logs meanwhile
    tracker.start()
    release = tracker.release if isinstance(tracker, BackgroundTracker) else None
    if not resume:
        tracker.log_params(cfg.model_dump(mode="json"))
    status: Literal["FINISHED", "FAILED", "KILLED"] = "FAILED"  # as Tracker.end takes it
    try:
        central = make_central_eval(cfg)
        state = run_federation(grid, cfg, out_dir=out, resume=resume, central_eval=central,
                               central_logits=central.logits if central is not None else None,
                               on_round=lambda row, _state: tracker.log_round(row),
                               on_pushed=lambda _rnd: release() if release is not None else None)
        tracker.log_calibration(state.calibration, step=state.round)
        personal = state.personalization if state.personalization and "sites" in state.personalization else None
        report = write_report(state.history, out_dir=out, title=f"fedmed: {cfg.name}",
                              classes=list(cfg.data.classes), config=cfg.model_dump(mode="json"),
                              calibration=state.calibration,
                              sections=[*([personalization_html(personal)] if personal else []),
                                        *([cross_site_html(state.cross_site)] if state.cross_site
                                          and "matrix" in state.cross_site else [])])
        summary = {"rounds": state.round, "best_round": state.best_round, "best_score": state.best_score,
                   "final": {k: v for k, v in state.history[-1].items() if isinstance(v, (int, float))}
                   if state.history else {}}
        problems = site_problems(state.history)
        if problems:  # refused or failed sites, with the reason they sent (code + public text)
            summary["site_problems"] = problems
            for site, text in problems.items():
                log.warning("site %s: %s", site, text)
        summary["stopped_early"] = state.stopped_early  # None: ran every round (or stopped by hand)
        if state.cross_site is not None:
            summary["cross_site"] = state.cross_site
        if state.personalization is not None:
            summary["personalization"] = (personalization_summary(personal) if personal else state.personalization)
        if state.calibration is not None:
            summary["calibration"] = calibration_summary(state.calibration)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        print(summary_table(state.history), flush=True)
        tracker.log_artifacts([p for p in [out / "best_model.pt", out / "last_model.pt", report,
                                           out / "summary.json", *out.glob("*.png")] if p.exists()])
        status = "FINISHED"
    finally:
        tracker.end(status)
    return out


def run_evaluation(grid: Grid, run_config: dict) -> Path:
    """``fedmed-server --evaluate``: the saved model scored at every site, no training."""
    from fedmed.checkpoint import load_checkpoint
    from fedmed.server.evaluation import evaluate_federation

    cfg = FedmedConfig.model_validate_json(Path(str(run_config["fedmed-config"])).read_text())
    out = Path(str(run_config["out-dir"]))
    evaluate_federation(grid, cfg, load_checkpoint(str(run_config["evaluate-model"])), out_dir=out,
                        split=str(run_config.get("evaluate-split", "test")),
                        n_boot=int(run_config.get("bootstrap", 200)))
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    # One plain line per round (and per change while waiting for sites) on the run's output,
    # which fedmed-server shows on its console.
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    problem = shorten_reply_pulls()  # Flower's HttpGrid waited ~1 s for most replies (server/flower_compat.py)
    if problem is not None:
        log.warning("replies are pulled with Flower's own backoff (%s)", problem)
    run_config = dict(context.run_config)
    if run_config.get("evaluate-model"):
        run_evaluation(grid, run_config)
        return
    if run_config.get("fedmed-task") == "stats":
        from fedmed.server.stats import run_stats

        run_stats(grid, run_config)
        return
    run(grid, run_config)
