"""DP-SGD at the site: cumulative ε over rounds, a ledger that survives restarts, site caps."""

from __future__ import annotations

import pytest
import yaml
from flwr.app import Context, RecordDict

from fedmed.client.app import _private_round
from fedmed.client.site import runtime_for
from fedmed.config import load_config
from fedmed.privacy import BudgetError, PrivacyLedger
from fedmed.server.federation import job_for_sites


def _runtime(synth_config, synth_root, tmp_path, *, site_caps: dict, privacy: dict, rounds: int = 3):
    cfg, path = synth_config(privacy={"enabled": True, **privacy},
                             federation={"rounds": rounds, "local_epochs": 1},
                             model={"variant": "record"})
    job = job_for_sites(load_config(path))
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_a", "data_dir": str(synth_root / "hospital_a"),
                                         "state_dir": str(tmp_path / "state"), **site_caps}))
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)},
                  state=RecordDict(), run_config={})
    return runtime_for(job, ctx)


def test_epsilon_accumulates_to_target_and_survives_restart(synth_config, synth_root, tmp_path):
    rt = _runtime(synth_config, synth_root, tmp_path, site_caps={"max_epsilon": 8.0},
                  privacy={"target_epsilon": 4.0, "target_delta": 1e-3})
    eps = [_private_round(rt, lr=1e-3, mu=0.0, rnd=r, federation="f1")[1] for r in (1, 2, 3)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(4.0, rel=0.1)  # the plan spends the target over all rounds
    ledger = PrivacyLedger(tmp_path / "state" / "privacy" / "f1.json", accountant="rdp")
    assert ledger.epsilon(1e-3) == pytest.approx(eps[2])  # a restarted site knows what it spent
    with pytest.raises(BudgetError, match="budget spent"):  # a 4th round would overspend
        _private_round(rt, lr=1e-3, mu=0.0, rnd=4, federation="f1")


def test_site_refuses_plan_above_its_cap(synth_config, synth_root, tmp_path):
    rt = _runtime(synth_config, synth_root, tmp_path, site_caps={"max_epsilon": 1.0},
                  privacy={"target_epsilon": 8.0})
    with pytest.raises(BudgetError, match="refuses"):
        _private_round(rt, lr=1e-3, mu=0.0, rnd=1, federation="f2")


def test_spend_mode_trains_until_its_own_cap(synth_config, synth_root, tmp_path):
    rt = _runtime(synth_config, synth_root, tmp_path, site_caps={"max_epsilon": 6.0, "budget": "spend"},
                  privacy={"target_epsilon": 8.0}, rounds=4)
    spent = []
    with pytest.raises(BudgetError, match="budget spent"):
        for r in range(1, 5):
            spent.append(_private_round(rt, lr=1e-3, mu=0.0, rnd=r, federation="f3")[1])
    assert 1 <= len(spent) < 4 and spent[-1] <= 6.0 * 1.01
