"""A site whose privacy budget is spent stops; the federation completes without it."""

from __future__ import annotations

import json

import pytest

from fedmed.config import load_config
from fedmed.server.federation import config_hash


@pytest.mark.slow
def test_spent_site_stops_and_federation_completes(synth_config, tmp_path):
    from fedmed.experiments.simulate import simulate

    _, path = synth_config(privacy={"enabled": True, "target_epsilon": 8.0},
                           federation={"rounds": 2, "min_sites": 2, "local_epochs": 1, "evaluate_every": 2},
                           model={"variant": "record"})
    cfg = load_config(path)
    # A simulated site keeps its ledger in the run folder: <out>/sites/<site>/privacy/<federation>.json.
    # hospital_c already spent its budget in this federation (its ledger survived a restart).
    ledger = tmp_path / "run" / "sites" / "hospital_c" / "privacy" / f"{config_hash(cfg)}.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"accountant": "rdp", "history": [[0.5, 0.2, 500]]}))

    state = simulate(cfg, sites=None, out_dir=tmp_path / "run")
    assert state.round == 2
    for row in state.history:
        assert set(row["sites_trained"]) == {"hospital_a", "hospital_b"}
        reasons = " ".join(row["sites_rejected"].values())
        assert "budget spent" in reasons
    eps = state.history[-1]["train_per_site"]["hospital_a"]["epsilon"]
    assert 0 < eps <= 8.0 * 1.01
