"""`fedmed simulate`: the deployment's ServerApp and ClientApp under Flower's simulation engine."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmed.client.app import app as client_app
from fedmed.config import load_config
from fedmed.experiments.simulate import federation_sites, simulate
from fedmed.server.central import make_central_eval
from fedmed.server.checkpoint import load_state
from fedmed.server.federation import run_federation


def test_two_round_simulation_of_three_sites(synth_config, synth_root, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
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

    # The federation ends with temperature scaling of the best model, fitted over the sites.
    cal = state.calibration
    assert cal["method"] == "federated" and cal["fit"]["sites"] == ["hospital_a", "hospital_b", "hospital_c"]
    assert cal["fit"]["sites_failed"] == {} == cal["sites_failed"]
    assert 0.05 <= cal["temperature"] <= 20 and cal["model"] == "best_model.pt"
    assert cal["pooled"]["num-examples"] == sum(m["num-examples"] for m in last["per_site"].values())
    assert sum(cal["pooled"]["bins_after_count"]) == cal["pooled"]["num-examples"]
    for where in ("pooled", "central_test"):
        assert all(0 <= cal[where][k] <= 1 for k in ("ece_before", "ece_after"))
        assert all(math.isfinite(cal[where][k]) for k in ("nll_before", "nll_after"))
    # At T = 1 the sites reproduce the best round's own evaluation: same model, test split, ECE.
    best = state.history[cal["round"] - 1]["per_site"]
    assert cal["round"] == state.best_round
    # the last round's evaluation brought the val NLL curves: calibrating that round's model asks no
    # fit step of its own (an earlier best round is fitted by its own exchange); the curves stay
    # out of the round's metrics
    assert (cal["fit"].get("asked") == "with the last round's evaluation") == (cal["round"] == state.round)
    assert not any("nll_curve" in k for m in last["per_site"].values() for k in m)
    for site, m in cal["sites"].items():
        assert m["ece_before"] == pytest.approx(best[site]["ece"], abs=1e-5)
        assert m["num-examples"] == best[site]["num-examples"]
    assert summary["calibration"]["temperature"] == cal["temperature"]
    assert summary["calibration"]["pooled"]["ece_after"] == cal["pooled"]["ece_after"]
    assert "bins_after_count" not in summary["calibration"]["pooled"]
    assert torch.load(out / "best_model.pt", weights_only=True)["temperature"] == cal["temperature"]
    report = (out / "report.html").read_text()
    assert "<h2>Calibration</h2>" in report and f"T = {cal['temperature']:.3f}" in report
    for name in ("reliability_before.png", "reliability_after.png", "reliability_central_after.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f'src="{name}"' in report
    from mlflow import MlflowClient

    logged = MlflowClient(f"sqlite:///{out}/mlflow.db").get_run((out / "mlflow_run_id").read_text().strip())
    assert logged.data.metrics["calibration_temperature"] == cal["temperature"]
    assert logged.data.metrics["ece_after"] == pytest.approx(cal["pooled"]["ece_after"])

    # Resuming the finished federation re-calibrates (here centrally) without redoing rounds.
    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower's runtimes for a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1)
    central = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"calibration": "central"})})
    held_out = make_central_eval(central)
    again = run_federation(_InProcessGrid(synth_root, ["hospital_a", "hospital_b", "hospital_c"]), central,
                           out_dir=out, resume=True, central_eval=held_out, central_logits=held_out.logits)
    assert again.round == 2 and again.history == state.history
    assert again.calibration["method"] == "central" and again.calibration["fit"]["on"] == "central val split"
    assert sorted(again.calibration["sites"]) == ["hospital_a", "hospital_b", "hospital_c"]
    assert again.calibration["central_test"]["ece_before"] == pytest.approx(cal["central_test"]["ece_before"])
    assert load_state(out).calibration == again.calibration  # the checkpoint round-trips it
    assert torch.load(out / "best_model.pt", weights_only=True)["temperature"] == again.calibration["temperature"]


@pytest.mark.slow  # a second Ray start-up: minutes on a 2-core machine; the CLI's checks below stay default
def test_simulation_resumes_from_its_checkpoint(synth_config, tmp_path: Path) -> None:
    """An interrupted (or too short) simulated federation continues: round 1 kept, only round 2 runs."""
    _, path = synth_config(federation={"rounds": 1, "local_epochs": 1}, train={"max_steps_per_epoch": 2})
    cfg = load_config(path)
    out = tmp_path / "sim"
    first = simulate(cfg, sites=None, out_dir=out, num_cpus_per_site=1, total_cpus=2)
    assert first.round == 1 and len(first.history[0]["sites_trained"]) == 3
    longer = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})})
    more = simulate(longer, sites=None, out_dir=out, num_cpus_per_site=1, total_cpus=2, resume=True)
    assert [h["round"] for h in more.history] == [1, 2]
    assert more.history[0] == first.history[0]  # round 1 as it was, not re-run
    assert sorted(more.history[1]["sites_trained"]) == ["hospital_a", "hospital_b", "hospital_c"]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_cli_resume_needs_a_stopped_federation_and_refuses_to_overwrite_one(synth_config, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fedmed.cli import main

    _, path = synth_config()
    empty, done = tmp_path / "empty", tmp_path / "done"
    empty.mkdir()
    done.mkdir()
    (done / "state.pkl").write_bytes(b"")
    assert main(["simulate", "-c", str(path), "--out", str(empty), "--resume"]) != 0
    assert "holds no stopped federation" in capsys.readouterr().err
    assert main(["simulate", "-c", str(path), "--out", str(done)]) != 0
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert (done / "state.pkl").read_bytes() == b""  # nothing overwritten


def test_sites_default_to_all_but_the_central_set(synth_config) -> None:
    _, path = synth_config(data={"sites": None})
    cfg = load_config(path)
    assert list(federation_sites(cfg)) == ["hospital_a", "hospital_b", "hospital_c"]


def test_too_few_sites_for_min_sites_is_a_clear_error(synth_config, tmp_path: Path) -> None:
    _, path = synth_config(federation={"min_sites": 3})
    with pytest.raises(ValueError, match="federation.min_sites=2"):
        simulate(load_config(path), sites=["hospital_a", "hospital_b"], out_dir=tmp_path / "x")


class _InProcessGrid:
    """The Grid's push/pull API delivering each message to the real ClientApp in this process
    (what Flower's engines do across processes): a resumed run needs no second Ray start."""

    def __init__(self, root: Path, sites: list[str]) -> None:
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(),
                                        run_config={"sites": ",".join(sites), "data-root": str(root)})
                         for i in range(len(sites))}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink assigns it
            self.replies[msg.metadata.message_id] = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
