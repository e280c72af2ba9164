"""federation.cross_site: global and local models scored at every site, as site policies allow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import load_config
from fedmed.server.app import run as run_server
from fedmed.server.checkpoint import load_state

SITES = ["hospital_a", "hospital_b", "hospital_c"]
POLICY = {"hospital_a": "share", "hospital_b": "relay", "hospital_c": "private"}
ALLOW = ["train", "evaluate", "evaluate.calibration", "query", "evaluate.crosssite"]  # sites opt in
_spec = importlib.util.spec_from_file_location(
    "simulate_tests", Path(__file__).resolve().parents[1] / "experiments" / "test_simulate.py")
_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim)


class _PolicyGrid(_sim._InProcessGrid):
    """The in-process grid, each node started from a site YAML that sets its local_model policy."""

    def __init__(self, root: Path, work: Path) -> None:
        super().__init__(root, SITES)
        for i, site in enumerate(SITES):
            path = work / site / "site.yaml"
            path.parent.mkdir(parents=True)
            path.write_text(yaml.safe_dump({"site": site, "data_dir": str(root / site), "device": "cpu",
                                            "state_dir": str(work / site),
                                            "policy": {"local_model": POLICY[site], "allowed_messages": ALLOW}}))
            self.contexts[i + 1] = Context(run_id=1, node_id=i + 1, node_config={"site-config": str(path)},
                                           state=RecordDict(), run_config={})


def test_cross_site_matrix_respects_each_sites_policy(synth_config, synth_root, tmp_path, monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    _, path = synth_config(federation={"rounds": 2, "local_epochs": 1, "calibration": "off", "cross_site": True},
                           train={"max_steps_per_epoch": 4})
    cfg = load_config(path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(cfg.model_dump_json())
    run_server(_PolicyGrid(synth_root, tmp_path / "sites"),
               {"fedmed-config": str(out / "config.json"), "out-dir": str(out), "mlflow-uri": f"sqlite:///{out}/mlflow.db"})
    state = load_state(out)
    cs = state.cross_site
    assert cs["failed"] == {} and cs["sites"] == SITES and cs["models"] == ["global", *SITES]
    assert cs["policy"] == POLICY and cs["budget_epochs"] == 2
    m = cs["matrix"]
    # the global and the relayed/shared local models were scored everywhere; the private one at home only
    for name in ("global", "hospital_a", "hospital_b"):
        assert sorted(m[name]) == SITES
    assert sorted(m["hospital_c"]) == ["hospital_c"]
    best = state.history[state.best_round - 1]["per_site"]
    for site in SITES:  # the global row is the best round's own evaluation at each site
        assert m["global"][site]["auc"] == pytest.approx(best[site]["auc"], abs=1e-6)
        assert (tmp_path / "sites" / site / "crosssite").is_dir()  # each site kept its local model
    # a local model is not the global one
    assert any(abs(m[s][s]["auc"] - m["global"][s]["auc"]) > 1e-6 for s in SITES)
    # only the 'share' site's model was written by the server
    assert sorted(p.name for p in (out / "local_models").iterdir()) == ["hospital_a.pt"]
    report = (out / "report.html").read_text()
    assert "<h2>Cross-site validation</h2>" in report and "hospital_c: private" in report
    assert (out / "cross_site.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["cross_site"]["kept"] == ["hospital_a"]


@pytest.mark.slow
def test_cross_site_matrix_over_real_supernodes(synth_config, synth_root, cache_dir, tmp_path):
    """The acceptance run: fedmed-server + three fedmed-client processes on loopback."""
    from fedmed.flower import free_port

    deploy = importlib.util.module_from_spec(
        spec := importlib.util.spec_from_file_location("deploy_tests", Path(__file__).with_name("test_deployment.py")))
    spec.loader.exec_module(deploy)
    _, cfg_path = synth_config(federation={"rounds": 3, "evaluate_every": 3, "cross_site": True})
    out, port, env = tmp_path / "run", free_port(), deploy._env(cache_dir)
    server = deploy._server(cfg_path, out, port, env)
    clients = [deploy._client(s, synth_root, tmp_path / "sites" / s, port, env, "--once", "--grace", "2",
                              f"policy.local_model={POLICY[s]}", f"policy.allowed_messages=[{','.join(ALLOW)}]")
               for s in SITES]
    try:
        assert server.wait(900) == 0, deploy._logs(tmp_path)
        for c in clients:
            assert c.wait(120) == 0, deploy._logs(tmp_path)
    finally:
        deploy._kill_all(server, *clients)
    cs = json.loads((out / "summary.json").read_text())["cross_site"]
    assert cs["failed"] == {} and cs["policy"] == POLICY and cs["kept"] == ["hospital_a"]
    assert sorted(cs["matrix"]["hospital_b"]) == SITES and sorted(cs["matrix"]["hospital_c"]) == ["hospital_c"]
    assert "<h2>Cross-site validation</h2>" in (out / "report.html").read_text()
    for site in SITES:  # what left each site: the train step sent weights only where policy allows
        lines = [json.loads(x) for x in (tmp_path / "sites" / site / "audit.jsonl").read_text().splitlines()]
        cross = [x for x in lines if x["type"] == "evaluate.crosssite"]
        with_arrays = [x for x in cross if "arrays" in x["keys"]]
        assert len(with_arrays) == (0 if POLICY[site] == "private" else 1)
    print(json.dumps({m: {s: round(v["auc"], 4) for s, v in row.items()} for m, row in cs["matrix"].items()}))


@pytest.mark.parametrize("other", [{"secure_aggregation": True}, {"client_dp": "server-fixed"}])
def test_cross_site_is_refused_where_single_site_models_must_stay_hidden(other):
    from fedmed.config import FederationConfig

    with pytest.raises(ValueError, match="cross_site sends each site's own local model"):
        FederationConfig(cross_site=True, **other)
