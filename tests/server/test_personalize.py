"""federation.personalize: each site fine-tunes the final model, keeps it, reports both models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedmed.client.personalize import select_layers
from fedmed.config import load_config
from fedmed.server.app import run as run_server
from fedmed.server.checkpoint import load_state
from fedmed.task import model_from_config

SITES = ["hospital_a", "hospital_b", "hospital_c"]
_spec = importlib.util.spec_from_file_location(
    "simulate_tests", Path(__file__).resolve().parents[1] / "experiments" / "test_simulate.py")
_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim)


def test_select_layers_freezes_the_rest_and_refuses_unknown_names(synth_config):
    _, path = synth_config()
    model = model_from_config(load_config(path))
    n = select_layers(model, ["classifier"])
    assert n == sum(p.numel() for p in model.classifier.parameters())
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith("classifier."))
    from fedmed.messages import PublicRefusal

    with pytest.raises(PublicRefusal, match="match no parameter"):
        select_layers(model, ["no_such_layer"])


def test_sites_fine_tune_the_final_model_and_keep_it(synth_config, synth_root, tmp_path, monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    monkeypatch.setenv("FEDMED_SIM_STATE_DIR", str(tmp_path / "site-state"))
    _, path = synth_config(federation={"rounds": 2, "local_epochs": 1, "calibration": "off",
                                       "personalize": {"epochs": 3, "layers": ["head", "classifier"], "lr": 0.005}},
                           train={"max_steps_per_epoch": 4})
    cfg = load_config(path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(cfg.model_dump_json())
    run_server(_sim._InProcessGrid(synth_root, SITES),
               {"fedmed-config": str(out / "config.json"), "out-dir": str(out), "mlflow-uri": f"sqlite:///{out}/mlflow.db"})
    state = load_state(out)
    res = state.personalization
    assert sorted(res["sites"]) == SITES and res["sites_failed"] == {}
    best = state.history[state.best_round - 1]["per_site"]
    global_sd = torch.load(out / "best_model.pt", weights_only=True)["model"]
    changed = 0
    for site in SITES:
        r = res["sites"][site]
        # the "global" column is the best round's own evaluation at that site: same model, same test split
        assert r["global"]["auc"] == pytest.approx(best[site]["auc"], abs=1e-6)
        assert r["num-examples"] == best[site]["num-examples"]
        changed += abs(r["personalized"]["loss"] - r["global"]["loss"]) > 1e-4
        # the personalised model stayed at the site; only head and classifier moved
        saved = list((tmp_path / "site-state" / site / "personalized").glob("*.pt"))
        assert len(saved) == 1
        own = torch.load(saved[0], weights_only=True)["model"]
        for k, v in own.items():
            moved = not torch.equal(v, global_sd[k])
            assert moved == (k.startswith(("head.", "classifier.")) and moved), k
        assert any(not torch.equal(own[k], global_sd[k]) for k in own if k.startswith("classifier."))
    assert changed == 3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["personalization"]["pooled"]) == {"global", "personalized"}
    assert "<h2>Personalisation</h2>" in (out / "report.html").read_text()
