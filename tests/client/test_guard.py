"""What leaves a site: every reply of the real ClientApp holds only the allow-listed vocabulary.

The ClientApp object (with its guard mod) is driven with real Flower messages, DP off and on,
and each reply is inspected: record types, keys, metric names, and that no patient id or raw
record value of the site appears anywhere in it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fedmed.client.app import app
from fedmed.client.guard import privacy_guard
from fedmed.config import load_config
from fedmed.job import job_for_sites
from fedmed.messages import ERROR_CODES, JOB_KEY, REPLY_KEYS, encode_job
from fedmed.task import model_from_config
from fedmed.transfer import nbytes, pack

ALLOWED_METRICS = {
    "num-examples", "train_loss", "train_seconds", "train_steps", "epsilon", "accuracy",
    "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece", "loss", "confusion_matrix",
    # the same metrics of the site's val split (what the coordinator selects rounds by)
    *(f"val_{k}" for k in ("num-examples", "accuracy", "balanced_accuracy", "auc", "f1", "sensitivity",
                           "specificity", "ece", "loss")),
    # temperature scaling after the last round (evaluate.calibration): an NLL curve, then
    # ECE/NLL before and after and the reliability-bin sums — numbers only
    "nll_curve", "ece_before", "ece_after", "nll_before", "nll_after",
    *(f"bins_{w}_{k}" for w in ("before", "after") for k in ("count", "conf", "correct")),
}


def _message(kind: str, content: RecordDict) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                  message_type=kind)
    return Message(metadata=md, content=content)


def _identifying_strings(site_dir) -> set[str]:
    """Patient ids and raw record cells of the site (what must never leave)."""
    records = pd.read_csv(site_dir / "records.csv", dtype=str)
    values = set(records["patient_id"])
    values |= {v for v in records.get("notes", pd.Series(dtype=str)).dropna() if len(v) > 8}
    return values


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
def test_every_reply_holds_only_weights_metrics_and_site_name(synth_config, synth_root, tmp_path, dp):
    _, path = synth_config(privacy={"enabled": dp, "target_epsilon": 8.0},
                           federation={"rounds": 2, "local_epochs": 1})
    cfg = load_config(path)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_b", "data_dir": str(synth_root / "hospital_b"),
                                         "state_dir": str(tmp_path / "state")}))
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml),
                                                     "audit-log": str(tmp_path / "audit.jsonl")},
                  state=RecordDict(), run_config={})
    arrays = pack(model_from_config(cfg).state_dict())
    config = ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), "lr": 1e-3, "federation-id": "t"})
    replies = []
    for rnd in (1, 2):
        config["server-round"] = rnd
        for kind in ("train", "evaluate"):
            reply = app(_message(kind, RecordDict({"arrays": arrays, "config": config})), ctx)
            assert not reply.has_error(), reply.error
            replies.append(reply)
            if kind == "train":
                arrays = reply.content["arrays"]
    # The federation's last step: fit (val NLL on the server's grid), then measure (test split).
    grid = [0.5, 1.0, 2.0]
    for step, extra in (("fit", {"temperatures": grid}), ("measure", {"temperature": 1.5})):
        cal = ConfigRecord({JOB_KEY: config[JOB_KEY], "calibration": step, **extra})
        reply = app(_message("evaluate.calibration", RecordDict({"arrays": arrays, "config": cal})), ctx)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    fit, measured = (r.content["metrics"] for r in replies[-2:])
    assert fit["num-examples"] > 0 and len(fit["nll_curve"]) == len(grid)
    assert all(np.isfinite(fit["nll_curve"])) and set(fit.keys()) == {"num-examples", "nll_curve"}
    assert sum(measured["bins_before_count"]) == sum(measured["bins_after_count"]) == measured["num-examples"]
    assert len(measured["bins_after_conf"]) == 15 and 0 <= measured["ece_after"] <= 1

    secrets = _identifying_strings(synth_root / "hospital_b")
    names = set(arrays.keys())
    for reply in replies:
        content = reply.content
        assert set(content.keys()) <= REPLY_KEYS
        assert isinstance(content["metrics"], MetricRecord)
        assert set(content["metrics"].keys()) <= ALLOWED_METRICS
        assert dict(content["site"]) == {"name": "hospital_b"}
        if "arrays" in content:
            assert set(content["arrays"].keys()) == names  # model parameters only
            for a in content["arrays"].values():
                assert np.issubdtype(a.numpy().dtype, np.number)
        text = json.dumps({k: (v if not isinstance(v, list) else v[:50])
                           for k, v in content["metrics"].items()}) + json.dumps(dict(content["site"]))
        assert not any(s in text for s in secrets)
    if dp:
        eps = [r.content["metrics"]["epsilon"] for r in replies if "arrays" in r.content]
        assert 0 < eps[0] < eps[1] <= 8.0 * 1.01
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 6 and all(set(a["keys"]) <= REPLY_KEYS for a in audit)
    assert [a["type"] for a in audit[-2:]] == ["evaluate.calibration"] * 2
    assert audit[-2]["metrics"]["nll_curve"] == fit["nll_curve"]  # the audit log says what left
    assert audit[-1]["metrics"]["bins_after_count"] == measured["bins_after_count"]
    # What a site uploads per round is the model and a few hundred bytes of metrics/metadata.
    model_bytes = nbytes(model_from_config(cfg).state_dict())
    for a in audit:
        if a["type"] == "train":
            assert model_bytes < a["bytes"] <= 1.02 * model_bytes
        else:
            assert a["bytes"] < 0.02 * model_bytes
    assert not any(s in (tmp_path / "audit.jsonl").read_text() for s in secrets)


def test_guard_blocks_anything_outside_the_allow_list(tmp_path, synth_root):
    request = _message("train", RecordDict())
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_a", "data_dir": str(synth_root / "hospital_a")}))
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml),
                                                     "audit-log": str(tmp_path / "audit.jsonl")},
                  state=RecordDict(), run_config={})

    def leaky(msg, ctx):
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 3}),
                                           "rows": ConfigRecord({"patient": "P-0001"})}), reply_to=msg)

    def sneaky_site(msg, ctx):
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 3}),
                                           "site": ConfigRecord({"name": "a", "mrn": "MRN-00123"})}), reply_to=msg)

    for handler in (leaky, sneaky_site):
        reply = privacy_guard(request, ctx, handler)
        # blocked: an error reply with the guard's code, nothing of what the handler built
        assert reply.has_error() and reply.error.code == ERROR_CODES["guard"]
        # (values no hex reference can contain: "123" alone once matched the reason's random ref)
        assert "P-0001" not in reply.error.reason and "MRN-00123" not in reply.error.reason
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["error"].split(" ")[0] for a in audit] == ["fedmed/guard"] * 2
