"""Tracker against a real MLflow sqlite store: rounds read back, resume, config-only params."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedmed.server.tracking import Tracker, calibration_metrics, flatten_config, round_metrics

SENTINEL = "PATIENT-0042-SENTINEL"


def _row(rnd: int) -> dict:
    return {
        "round": rnd, "seconds": 1.5 * rnd, "sites_connected": 2,
        "sites_trained": ["alpha", "beta"], "sites_rejected": {"gamma": f"NaN in update from {SENTINEL}"},
        "sites_eval_failed": [], "train_loss": 1.0 / rnd, "fed_auc": 0.5 + 0.1 * rnd,
        "fed_worst_auc": float("nan"),
        "train_per_site": {"alpha": {"loss": 0.9 / rnd, "num-examples": 10}},
        "per_site": {
            "alpha": {"auc": 0.6 + 0.05 * rnd, "num-examples": 10, "confusion_matrix": [1, 2, 3, 4]},
            "beta": {"auc": 0.7, "epsilon": 0.5 * rnd, "num-examples": 20, "note": SENTINEL},
        },
        "central_test_confusion_matrix": [[1, 0], [0, 1]],
    }


CONFIG = {"name": "demo", "federation": {"rounds": 3, "strategy": {"name": "fedavg", "mu": 0.0}},
          "data": {"classes": ["benign", "malignant"]}, "model": {"name": "resnet18", "blob": "x" * 7000}}


def _tracker(tmp_path: Path, *, uri: str | None = None, **kw) -> Tracker:
    return Tracker(uri=uri, experiment="fedmed-test", run_name="demo", out_dir=tmp_path, **kw)


def test_rounds_params_and_resume(tmp_path: Path) -> None:
    tr = _tracker(tmp_path)
    run_id = tr.start()
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id
    tr.log_params(CONFIG)
    for rnd in (1, 2, 3):
        tr.log_round(_row(rnd))
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    tr.log_artifacts([report, tmp_path / "missing.png"])
    tr.log_calibration(CALIBRATION, step=3)
    tr.end()

    client = MlflowClient(tracking_uri=tr.uri)
    hist = client.get_metric_history(run_id, "fed_auc")
    assert [(m.step, round(m.value, 6)) for m in sorted(hist, key=lambda m: m.step)] == [
        (1, 0.6), (2, 0.7), (3, 0.8)]
    eps = client.get_metric_history(run_id, "site.beta.epsilon")
    assert sorted((m.step, m.value) for m in eps) == [(1, 0.5), (2, 1.0), (3, 1.5)]
    run = client.get_run(run_id)
    names = set(run.data.metrics)
    assert {"site.alpha.auc", "site.beta.auc", "site.alpha.num-examples",
            "site.alpha.train_loss", "train_loss", "seconds"} <= names
    assert "fed_worst_auc" not in names                      # NaN skipped
    assert not any("confusion_matrix" in n or "note" in n for n in names)   # lists/strings skipped
    params = run.data.params
    assert params["federation.strategy.name"] == "fedavg"
    assert params["data.classes"] == "benign,malignant"
    assert len(params["model.blob"]) == 6000
    assert not any(SENTINEL in v for v in params.values())  # only config reaches params
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["report.html"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "calibration_temperature")] == [(3, 1.5)]
    assert run.data.metrics["ece_after"] == 0.02 and run.data.metrics["site.alpha.ece_before"] == 0.2

    resumed = _tracker(tmp_path, resume=True)
    assert resumed.start() == run_id
    resumed.log_round(_row(4))
    resumed.end()
    assert len(client.get_metric_history(run_id, "fed_auc")) == 4
    by_id = _tracker(tmp_path / "elsewhere", resume_run_id=run_id, uri=tr.uri)
    assert by_id.start() == run_id
    assert _tracker(tmp_path).start() != run_id             # no resume: a new run


CALIBRATION = {"method": "federated", "temperature": 1.5, "fit": {"sites": ["alpha"]},
               "pooled": {"ece_before": 0.1, "ece_after": 0.02, "nll_before": 0.7, "nll_after": 0.5,
                          "bins_before_count": [1.0, 2.0]},
               "sites": {"alpha": {"ece_before": 0.2, "ece_after": float("nan"), "note": SENTINEL}},
               "central_test": {"ece_before": 0.3, "ece_after": 0.1}}


def test_calibration_metrics() -> None:
    assert calibration_metrics(CALIBRATION) == {
        "calibration_temperature": 1.5, "ece_before": 0.1, "ece_after": 0.02, "nll_before": 0.7,
        "nll_after": 0.5, "central_test_ece_before": 0.3, "central_test_ece_after": 0.1,
        "site.alpha.ece_before": 0.2}
    assert calibration_metrics(None) == {} == calibration_metrics({"method": "federated", "error": "x"})


def test_flatten_and_round_metrics() -> None:
    flat = flatten_config({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None})
    assert flat == {"a.b.c": "1", "a.d": "1,2", "e": "None"}
    m = round_metrics({"round": 2, "ok": True, "x": float("inf"), "y": 3,
                       "per_site": {"site a:1": {"auc": 0.5}}})
    assert m == {"y": 3.0, "site.site a_1.auc": 0.5}


def test_failures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = Tracker(uri="nosuchscheme://nowhere", experiment="x", run_name="r", out_dir=tmp_path)
    with pytest.raises(ValueError, match="nosuchscheme://nowhere"):
        bad.start()
    with pytest.raises(ValueError, match="resume run"):
        _tracker(tmp_path, resume_run_id="0" * 32).start()
    tr = _tracker(tmp_path)
    tr.start()

    class Broken:
        def __getattr__(self, name):
            def fail(*a, **k):
                raise ConnectionError("tracking server down")
            return fail

    tr._client = Broken()
    with caplog.at_level(logging.WARNING, logger="fedmed.server.tracking"):
        tr.log_round(_row(1))                               # must not raise
        tr.log_params(CONFIG)
        tr.end("FAILED")
    assert "tracking server down" in caplog.text


def test_background_tracker_logs_the_same_rows_in_order_and_raises_a_failed_start(tmp_path: Path) -> None:
    from fedmed.server.tracking import BackgroundTracker

    tr = BackgroundTracker(_tracker(tmp_path))
    tr.start()
    tr.log_params(CONFIG)
    row = _row(1)
    tr.log_round(row)
    row["fed_auc"] = 0.0  # changed after queuing: the queued copy is what is logged
    tr.log_round(_row(2))
    tr.end("FINISHED")
    client = MlflowClient(tracking_uri=tr.tracker.uri)
    run = client.get_run(tr.tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(run.info.run_id, "fed_auc")] \
        == [(1, 0.6), (2, 0.7)]

    bad = BackgroundTracker(Tracker(uri="nosuchscheme://nowhere", experiment="x", run_name="r", out_dir=tmp_path))
    bad.start()
    deadline = time.monotonic() + 60
    while bad._error is None and time.monotonic() < deadline:  # the worker's start fails meanwhile
        time.sleep(0.05)
    with pytest.raises(ValueError, match="nosuchscheme://nowhere"):
        bad.log_round(_row(1))
    bad.end("FAILED")  # does not raise again


def test_a_held_background_tracker_starts_mlflow_only_once_released(tmp_path: Path) -> None:
    """``hold=True``: MLflow's start waits for ``release()`` (round 1's messages are out); then the
    calls queued meanwhile reach MLflow in order. Never released (a failed federation): ``end`` logs all."""
    from mlflow.tracking import MlflowClient

    from fedmed.server.tracking import BackgroundTracker

    for released in (True, False):
        out = tmp_path / f"released-{released}"
        out.mkdir()
        tr = BackgroundTracker(_tracker(out, uri=f"sqlite:///{out}/mlflow.db"), hold=True)
        tr.start()
        tr.log_params(CONFIG)
        tr.log_round(_row(1))
        time.sleep(0.5)  # a worker that ignored the hold would have begun by now
        assert tr.tracker.run_id is None and not (out / "mlflow.db").exists()
        if released:
            tr.release()
        tr.log_round(_row(2))
        tr.end("FINISHED" if released else "FAILED")
        client = MlflowClient(tracking_uri=tr.tracker.uri)
        run = client.get_run(tr.tracker.run_id)
        assert run.info.status == ("FINISHED" if released else "FAILED")
        assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(run.info.run_id, "fed_auc")] \
            == [(1, 0.6), (2, 0.7)]
