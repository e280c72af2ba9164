"""The after-federation handlers facing a hostile coordinator or a site whose data does not fit."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from fedmed.client.app import app as client_app
from fedmed.messages import CROSS_SITE_TYPE, EXTERNAL_EVAL_TYPE, PERSONALIZE_TYPE

pytestmark = pytest.mark.usefixtures("task_identity")


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
def test_hostile_requests_are_refused_before_any_work(cfg, synth_root, tmp_path, kind, config, refusal, site_context,
                                                      job_message):
    ctx = site_context(synth_root / "hospital_a", tmp_path, allow=[kind])
    reply = client_app(job_message(cfg, kind, **config), ctx)
    assert reply.has_error() and refusal in reply.error.reason  # a public refusal: the server sees why
    assert not (tmp_path / "personalized").exists() and not (tmp_path / "crosssite").exists()


def test_data_that_does_not_fit_is_named_in_the_site_log_only(cfg, synth_root, tmp_path, caplog, site_context,
                                                              job_message):
    site = tmp_path / "odd"
    shutil.copytree(synth_root / "hospital_b", site)
    rec = pd.read_csv(site / "records.csv", dtype=str)
    rec.loc[rec.index[:2], "label"] = "secret-label-value"
    rec.to_csv(site / "records.csv", index=False)
    pd.read_csv(site / "images.csv", dtype=str).drop(columns=["label"]).to_csv(site / "images.csv", index=False)
    work = tmp_path / "work"
    work.mkdir()
    with caplog.at_level("ERROR", logger="fedmed.client"):
        reply = client_app(job_message(cfg, EXTERNAL_EVAL_TYPE, split="all", temperature=1.0),
                           site_context(site, work, allow=[EXTERNAL_EVAL_TYPE]))
    assert reply.has_error() and reply.error.reason.startswith("fedmed/site-data ref=")
    assert "does not fit the model" in reply.error.reason and "secret-label-value" not in reply.error.reason
    assert str(site) not in reply.error.reason
    assert "secret-label-value" in caplog.text  # the site's own log says what differs
    audit = (work / "audit.jsonl").read_text()
    assert "secret-label-value" not in audit and "fedmed/site-data" in audit


def test_a_site_answers_cross_site_only_when_its_policy_opts_in(cfg, synth_root, tmp_path, site_context, job_message):
    reply = client_app(job_message(cfg, CROSS_SITE_TYPE, crosssite="train", epochs=1),
                       site_context(synth_root / "hospital_a", tmp_path))  # default policy
    assert reply.has_error() and "evaluate.crosssite is not allowed by this site's policy" in reply.error.reason
    assert not (tmp_path / "crosssite").exists()
