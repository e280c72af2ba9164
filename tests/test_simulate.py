"""`fedmed simulate`: the deployment's ServerApp and ClientApp under Flower's simulation engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedmed.config import load_config
from fedmed.simulate import federation_sites, simulate


def test_two_round_simulation_of_three_sites(synth_config, tmp_path: Path) -> None:
    _, path = synth_config(federation={"rounds": 2, "local_epochs": 1},
                           train={"max_steps_per_epoch": 4})
    cfg = load_config(path)
    out = tmp_path / "sim"
    state = simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=1, total_cpus=2)
    assert state.round == 2
    for name in ("summary.json", "report.html", "config.json", "timing.json", "last_model.pt"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert math.isfinite(summary["final"]["central_test_auc"])
    last = state.history[-1]
    assert sorted(last["sites_trained"]) == ["hospital_a", "hospital_b", "hospital_c"]
    assert sorted(last["per_site"]) == ["hospital_a", "hospital_b", "hospital_c"]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["rounds"] == 2 and timing["peak_rss_mb"] > 0


def test_sites_default_to_all_but_the_central_set(synth_config) -> None:
    _, path = synth_config(data={"sites": None})
    cfg = load_config(path)
    assert list(federation_sites(cfg)) == ["hospital_a", "hospital_b", "hospital_c"]


def test_too_few_sites_for_min_sites_is_a_clear_error(synth_config, tmp_path: Path) -> None:
    _, path = synth_config(federation={"min_sites": 3})
    with pytest.raises(ValueError, match="federation.min_sites=2"):
        simulate(load_config(path), sites=["hospital_a", "hospital_b"], out_dir=tmp_path / "x")
