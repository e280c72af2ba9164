"""The after-federation handlers facing a hostile coordinator or a site whose data does not fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmed.client.app import app as client_app
from fedmed.config import load_config
from fedmed.messages import CONFIG_KEY, CROSS_SITE_TYPE, EXTERNAL_EVAL_TYPE, JOB_KEY, PERSONALIZE_TYPE, encode_job
from fedmed.server.federation import job_for_sites
from fedmed.task import model_from_config
from fedmed.transfer import pack


def _context(site_dir: Path, work: Path, allow: list[str] | None = None) -> Context:
    path = work / "site.yaml"
    policy = {"allowed_messages": ["train", "evaluate", *(allow or [])]}
    path.write_text(yaml.safe_dump({"site": site_dir.name, "data_dir": str(site_dir), "device": "cpu",
                                    "state_dir": str(work), "policy": policy}))
    return Context(run_id=1, node_id=1, node_config={"site-config": str(path), "audit-log": str(work / "audit.jsonl")},
                   state=RecordDict(), run_config={})


def _message(cfg, kind: str, **config) -> Message:
    weights = {k: v.numpy() for k, v in model_from_config(cfg).state_dict().items()}
    content = RecordDict({"arrays": pack(weights),
                          CONFIG_KEY: ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), **config})})
    msg = Message(content=content, message_type=kind, dst_node_id=1)
    return msg


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower's runtimes for a real message
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def cfg(synth_config):
    _, path = synth_config(train={"max_steps_per_epoch": 2})
    return load_config(path)


@pytest.mark.parametrize("kind, config, refusal", [
    (EXTERNAL_EVAL_TYPE, {"n-boot": 10**7}, "n-boot"),
    (EXTERNAL_EVAL_TYPE, {"split": "train"}, "split must be one of"),
    (EXTERNAL_EVAL_TYPE, {"temperature": 0.0}, "temperature"),
    (PERSONALIZE_TYPE, {"epochs": 10**6, "layers": ["all"]}, "epochs"),
    (PERSONALIZE_TYPE, {"epochs": 1, "layers": ["no_such_layer"]}, "match no parameter"),
    (CROSS_SITE_TYPE, {"crosssite": "train", "epochs": 10**6}, "epochs"),
    (CROSS_SITE_TYPE, {"crosssite": "upload-data"}, "unknown cross-site step"),
    (PERSONALIZE_TYPE, {"epochs": 1, "layers": ["all"], "federation-id": "../../etc"}, "federation-id must be"),
])
def test_hostile_requests_are_refused_before_any_work(cfg, synth_root, tmp_path, kind, config, refusal):
    ctx = _context(synth_root / "hospital_a", tmp_path, allow=[kind])
    reply = client_app(_message(cfg, kind, **config), ctx)
    assert reply.has_error() and refusal in reply.error.reason  # a public refusal: the server sees why
    assert not (tmp_path / "personalized").exists() and not (tmp_path / "crosssite").exists()


def test_data_that_does_not_fit_is_named_in_the_site_log_only(cfg, synth_root, tmp_path, caplog):
    site = tmp_path / "odd"
    shutil.copytree(synth_root / "hospital_b", site)
    rec = pd.read_csv(site / "records.csv", dtype=str)
    rec.loc[rec.index[:2], "label"] = "secret-label-value"
    rec.to_csv(site / "records.csv", index=False)
    pd.read_csv(site / "images.csv", dtype=str).drop(columns=["label"]).to_csv(site / "images.csv", index=False)
    work = tmp_path / "work"
    work.mkdir()
    with caplog.at_level("ERROR", logger="fedmed.client"):
        reply = client_app(_message(cfg, EXTERNAL_EVAL_TYPE, split="all", temperature=1.0),
                           _context(site, work, allow=[EXTERNAL_EVAL_TYPE]))
    assert reply.has_error() and reply.error.reason.startswith("fedmed/site-data ref=")
    assert "does not fit the model" in reply.error.reason and "secret-label-value" not in reply.error.reason
    assert str(site) not in reply.error.reason
    assert "secret-label-value" in caplog.text  # the site's own log says what differs
    audit = (work / "audit.jsonl").read_text()
    assert "secret-label-value" not in audit and "fedmed/site-data" in audit


def test_a_site_answers_cross_site_only_when_its_policy_opts_in(cfg, synth_root, tmp_path):
    reply = client_app(_message(cfg, CROSS_SITE_TYPE, crosssite="train", epochs=1),
                       _context(synth_root / "hospital_a", tmp_path))  # default policy
    assert reply.has_error() and "evaluate.crosssite is not allowed by this site's policy" in reply.error.reason
    assert not (tmp_path / "crosssite").exists()
