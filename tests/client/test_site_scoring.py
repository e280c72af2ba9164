"""A site scores one set of weights once: the last round's evaluation and the calibration after it
share the forward passes, and new weights (or a site's own BatchNorm) are always scored afresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.calibration import collect_logits, nll_curve, temperature_grid
from fedmed.client import site as site_module
from fedmed.client.app import app as client_app
from fedmed.messages import CALIBRATION_ACTION
from fedmed.server.calibration import MESSAGE_TYPE as CALIBRATION_TYPE
from fedmed.task import model_from_config

pytestmark = pytest.mark.usefixtures("task_identity")


def test_evaluation_then_calibration_scores_each_split_once_and_new_weights_afresh(cfg, synth_root, tmp_path,
                                                                                     monkeypatch, site_context,
                                                                                     job_message):
    monkeypatch.setattr(site_module, "_CACHE", {})  # this test's own site runtime
    ctx = site_context(synth_root / "hospital_a", tmp_path, allow=[CALIBRATION_TYPE])
    torch.manual_seed(0)
    first = {k: v.numpy().copy() for k, v in model_from_config(cfg).state_dict().items()}
    temps = temperature_grid().tolist()

    reply = client_app(job_message(cfg, "evaluate", first, temperatures=temps), ctx)  # as the last round asks
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    with_eval = np.asarray(list(reply.content["metrics"]["val_nll_curve"]))
    (rt,) = site_module._CACHE.values()
    calls: list[int] = []
    rt.model.register_forward_hook(lambda *_: calls.append(1))

    fit_step = {CALIBRATION_ACTION: "fit", "temperatures": temps}
    fit = client_app(job_message(cfg, CALIBRATION_TYPE, first, **fit_step), ctx)
    assert not fit.has_error(), fit.error.reason if fit.has_error() else ""
    measured = client_app(job_message(cfg, CALIBRATION_TYPE, first, **{CALIBRATION_ACTION: "measure",
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
    fit2 = client_app(job_message(cfg, CALIBRATION_TYPE, second, **{CALIBRATION_ACTION: "fit", "temperatures": temps}),
                      ctx)
    assert not fit2.has_error()
    assert calls, "new weights must be scored with a new forward pass"
    assert not np.allclose(np.asarray(list(fit2.content["metrics"]["nll_curve"])), sent)

    # the same weights but one tensor, changed by a little (as a site's own BatchNorm under FedBN): scored again
    calls.clear()
    key = next(k for k in reversed(second) if k.endswith("bias"))
    third = {**second, key: second[key] + np.float32(1e-3)}
    client_app(job_message(cfg, CALIBRATION_TYPE, third, **{CALIBRATION_ACTION: "fit", "temperatures": temps}), ctx)
    assert calls


def test_a_hostile_grid_in_an_evaluation_is_refused_before_scoring(cfg, synth_root, tmp_path, monkeypatch, site_context,
                                                                   job_message):
    monkeypatch.setattr(site_module, "_CACHE", {})
    ctx = site_context(synth_root / "hospital_a", tmp_path, allow=[CALIBRATION_TYPE])
    weights = {k: v.numpy() for k, v in model_from_config(cfg).state_dict().items()}
    for temps, why in (([1.0] * 100_000, "policy.max_metric_list"), ([1.0, float("nan")], "finite number")):
        reply = client_app(job_message(cfg, "evaluate", weights, temperatures=temps), ctx)
        assert reply.has_error() and why in reply.error.reason
    (rt,) = site_module._CACHE.values()
    assert rt._scored == {}  # refused before any split was scored
