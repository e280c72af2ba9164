"""federation.early_stopping_rounds: the run stops once the selection score stalls, and says so."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import load_config
from fedmed.server.app import run as run_server
from fedmed.server.checkpoint import load_state
from fedmed.server.federation import run_federation

SITES = ["hospital_a", "hospital_b", "hospital_c"]
_spec = importlib.util.spec_from_file_location(
    "simulate_tests", Path(__file__).resolve().parents[1] / "experiments" / "test_simulate.py")
_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim)


@pytest.mark.parametrize("central", [True, False], ids=["central-val", "sites-val"])
def test_federation_stops_when_the_selection_score_stalls(synth_config, synth_root, tmp_path, monkeypatch, central):
    """With a central set the score is its val AUC; without one, the sites' val AUC (never a test split)."""
    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower's runtimes for a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1)
    # lr 1e-12: the global model cannot get better after round 1 — the weights move by ~1e-12 a
    # round, or (site policy: lr below 1e-3 is refused) not at all; either way the score stalls
    fed = {"rounds": 6, "local_epochs": 1, "early_stopping_rounds": 2}
    if not central:
        fed["central_test"] = None
    _, path = synth_config(federation=fed, train={"lr": 1e-12, "max_steps_per_epoch": 2})
    metric = "central_val_auc" if central else "fed_val_auc"
    cfg = load_config(path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(cfg.model_dump_json())
    grid = _sim._InProcessGrid(synth_root, SITES)
    run_server(grid, {"fedmed-config": str(out / "config.json"), "out-dir": str(out),
                      "mlflow-uri": f"sqlite:///{out}/mlflow.db"})
    state = load_state(out)
    assert state.round == 3 and state.best_round == 1 and len(state.history) == 3
    assert state.stopped_early == {"round": 3, "best_round": 1, "best_score": state.best_score, "patience": 2,
                                   "metric": metric}
    best = torch.load(out / "best_model.pt", weights_only=True)
    assert best["round"] == 1 and best["selected_by"] == metric
    assert all(metric in row for row in state.history)
    assert 0.05 <= state.calibration["temperature"] <= 20  # the best model is still calibrated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"]["round"] == 3 and summary["rounds"] == 3
    report = (out / "report.html").read_text()
    assert "stopped early" in report and f"{metric} has not improved for 2 round(s) since round 1" in report
    # an early stop is final: resuming does not train further rounds
    again = run_federation(grid, cfg, out_dir=out, resume=True)
    assert again.round == 3 and again.history == state.history
