"""A site scores one set of weights once: the last round's evaluation and the calibration after it
share the forward passes, and new weights (or a site's own BatchNorm) are always scored afresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmed.calibration import collect_logits, nll_curve, temperature_grid
from fedmed.client import site as site_module
from fedmed.client.app import app as client_app
from fedmed.config import load_config
from fedmed.messages import CALIBRATION_ACTION, CONFIG_KEY, JOB_KEY, encode_job
from fedmed.server.calibration import MESSAGE_TYPE as CALIBRATION_TYPE
from fedmed.server.federation import job_for_sites
from fedmed.task import model_from_config
from fedmed.transfer import pack


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower's runtimes for a real message
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def cfg(synth_config):
    _, path = synth_config(train={"max_steps_per_epoch": 2})
    return load_config(path)


def _context(site_dir: Path, work: Path) -> Context:
    path = work / "site.yaml"
    path.write_text(yaml.safe_dump({"site": site_dir.name, "data_dir": str(site_dir), "device": "cpu",
                                    "state_dir": str(work)}))
    return Context(run_id=1, node_id=1, node_config={"site-config": str(path), "audit-log": str(work / "audit.jsonl")},
                   state=RecordDict(), run_config={})


def _message(cfg, weights: dict[str, np.ndarray], kind: str, **config) -> Message:
    content = RecordDict({"arrays": pack(weights),
                          CONFIG_KEY: ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), **config})})
    return Message(content=content, message_type=kind, dst_node_id=1)


def test_evaluation_then_calibration_scores_each_split_once_and_new_weights_afresh(cfg, synth_root, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(site_module, "_CACHE", {})  # this test's own site runtime
    ctx = _context(synth_root / "hospital_a", tmp_path)
    torch.manual_seed(0)
    first = {k: v.numpy().copy() for k, v in model_from_config(cfg).state_dict().items()}
    temps = temperature_grid().tolist()

    reply = client_app(_message(cfg, first, "evaluate", temperatures=temps), ctx)  # as the last round asks
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    with_eval = np.asarray(list(reply.content["metrics"]["val_nll_curve"]))
    (rt,) = site_module._CACHE.values()
    calls: list[int] = []
    rt.model.register_forward_hook(lambda *_: calls.append(1))

    fit = client_app(_message(cfg, first, CALIBRATION_TYPE, **{CALIBRATION_ACTION: "fit", "temperatures": temps}), ctx)
    assert not fit.has_error(), fit.error.reason if fit.has_error() else ""
    measured = client_app(_message(cfg, first, CALIBRATION_TYPE, **{CALIBRATION_ACTION: "measure",
                                                                     "temperature": 1.5}), ctx)
    assert not measured.has_error()
    assert calls == []  # both calibration steps reused the evaluation's forward passes

    # the reused logits are what a fresh pass of the same weights gives
    z, y = collect_logits(rt.model, rt.loaders["val"])
    fresh = nll_curve(z, y, np.asarray(temps))
    sent = np.asarray(list(fit.content["metrics"]["nll_curve"]))
    np.testing.assert_allclose(sent, fresh, rtol=1e-6)
    np.testing.assert_array_equal(with_eval, sent)  # the evaluation's curve is the fit step's
    calls.clear()

    # other weights: scored again, and the numbers follow the new model
    torch.manual_seed(1)
    second = {k: v.numpy().copy() for k, v in model_from_config(cfg).state_dict().items()}
    fit2 = client_app(_message(cfg, second, CALIBRATION_TYPE, **{CALIBRATION_ACTION: "fit", "temperatures": temps}),
                      ctx)
    assert not fit2.has_error()
    assert calls, "new weights must be scored with a new forward pass"
    assert not np.allclose(np.asarray(list(fit2.content["metrics"]["nll_curve"])), sent)

    # the same weights but one tensor, changed by a little (as a site's own BatchNorm under FedBN): scored again
    calls.clear()
    key = next(k for k in reversed(second) if k.endswith("bias"))
    third = {**second, key: second[key] + np.float32(1e-3)}
    client_app(_message(cfg, third, CALIBRATION_TYPE, **{CALIBRATION_ACTION: "fit", "temperatures": temps}), ctx)
    assert calls


def test_a_hostile_grid_in_an_evaluation_is_refused_before_scoring(cfg, synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr(site_module, "_CACHE", {})
    ctx = _context(synth_root / "hospital_a", tmp_path)
    weights = {k: v.numpy() for k, v in model_from_config(cfg).state_dict().items()}
    for temps, why in (([1.0] * 100_000, "policy.max_metric_list"), ([1.0, float("nan")], "finite number")):
        reply = client_app(_message(cfg, weights, "evaluate", temperatures=temps), ctx)
        assert reply.has_error() and why in reply.error.reason
    (rt,) = site_module._CACHE.values()
    assert rt._scored == {}  # refused before any split was scored
