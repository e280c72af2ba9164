"""The coordinator's Flower ServerApp: run the federation, track it, report it.

Thin glue: settings come from the resolved config file named in the run config
(``fedmed-config``), written by ``fedmed-server`` or ``fedmed simulate``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.config import FedmedConfig
from fedmed.server.calibration import calibration_summary
from fedmed.server.central import make_central_eval
from fedmed.server.federation import run_federation
from fedmed.server.report import site_problems, summary_table, write_report
from fedmed.server.tracking import Tracker

__all__ = ["app", "run"]

log = logging.getLogger("fedmed.server")
app = ServerApp()


def run(grid: Grid, run_config: dict) -> Path:
    """Run the federation described by ``run_config``; returns its output folder."""
    cfg = FedmedConfig.model_validate_json(Path(str(run_config["fedmed-config"])).read_text())
    out = Path(str(run_config["out-dir"]))
    resume = bool(run_config.get("resume", False))
    tracker = Tracker(uri=str(run_config.get("mlflow-uri") or "") or cfg.tracking.mlflow_uri,
                      experiment=cfg.tracking.experiment, run_name=cfg.name, out_dir=out,
                      resume=resume)
    tracker.start()
    if not resume:
        tracker.log_params(cfg.model_dump(mode="json"))
    status = "FAILED"
    try:
        central = make_central_eval(cfg)
        state = run_federation(grid, cfg, out_dir=out, resume=resume, central_eval=central,
                               central_logits=central.logits if central is not None else None,
                               on_round=lambda row, _state: tracker.log_round(row))
        tracker.log_calibration(state.calibration, step=state.round)
        report = write_report(state.history, out_dir=out, title=f"fedmed: {cfg.name}",
                              classes=list(cfg.data.classes), config=cfg.model_dump(mode="json"),
                              calibration=state.calibration)
        summary = {"rounds": state.round, "best_round": state.best_round, "best_score": state.best_score,
                   "final": {k: v for k, v in state.history[-1].items() if isinstance(v, (int, float))}
                   if state.history else {}}
        problems = site_problems(state.history)
        if problems:  # refused or failed sites, with the reason they sent (code + public text)
            summary["site_problems"] = problems
            for site, text in problems.items():
                log.warning("site %s: %s", site, text)
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, dict(context.run_config))
