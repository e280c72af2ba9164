"""The site owns its privacy: a hostile coordinator's messages and a broken site, adversarially.

The real ClientApp (with its guard mod) is driven with real Flower messages. Every refusal
and failure must come back as an error reply with a fixed code and a site-side reference —
no exception text, no patient id, no file name, no absolute path — and a job outside the
site's policy must be refused before the site reads any data.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.error import Error

from fedmed.client.app import app
from fedmed.client.guard import privacy_guard
from fedmed.config import load_config
from fedmed.job import job_for_sites
from fedmed.messages import (
    ERROR_CODES,
    JOB_KEY,
    describe_error,
    encode_job,
    error_reason,
    new_ref,
    screen_metric_replies,
    screen_train_replies,
)
from fedmed.task import model_from_config
from fedmed.transfer import pack


def _message(kind: str, content: RecordDict) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                  message_type=kind)
    return Message(metadata=md, content=content)


def _site(tmp_path: Path, data_dir: Path, **site: object) -> Context:
    """A SuperNode's context whose site config is ``data_dir`` plus ``site`` settings."""
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_a", "data_dir": str(data_dir),
                                         "state_dir": str(tmp_path / "state"), **site}))
    return Context(run_id=1, node_id=1, node_config={"site": "hospital_a", "site-config": str(site_yaml),
                                                     "audit-log": str(tmp_path / "audit.jsonl")},
                   state=RecordDict(), run_config={})


def _send(ctx: Context, cfg, kind: str = "train", job: dict | None = None, **extra) -> Message:
    job = job if job is not None else job_for_sites(cfg)
    content = RecordDict({"arrays": pack(model_from_config(cfg).state_dict()),
                          "config": ConfigRecord({JOB_KEY: encode_job(job), "lr": 1e-3, "federation-id": "t",
                                                  "server-round": 1, **extra})})
    return app(_message(kind, content), ctx)


def _broken_site(tmp_path: Path) -> Path:
    """A folder whose records.csv any read would fail on: proves a refusal came before data."""
    d = tmp_path / "never-read"
    d.mkdir()
    (d / "records.csv").write_bytes(b"\x00\xff not a table")
    return d


def _assert_clean(reason: str, *secrets: str) -> None:
    assert reason.startswith("fedmed/"), reason
    assert "/" not in reason.split(" ", 1)[1].split(":", 1)[0]  # ref/site part: no paths
    for s in secrets:
        assert s not in reason, (s, reason)
    assert "Traceback" not in reason and "Error" not in reason


def test_broken_site_sends_code_and_reference_never_ids(synth_config, synth_root, tmp_path, caplog):
    """The reported leak: a label column full of patient ids; the reply says only 'site-data'."""
    bad = tmp_path / "hospital_a"
    bad.mkdir()
    records = pd.read_csv(synth_root / "hospital_a" / "records.csv", dtype=str)
    records["label"] = records["patient_id"]  # the id column where the label should be
    records.to_csv(bad / "records.csv", index=False)
    _, path = synth_config(model={"variant": "record"})
    ctx = _site(tmp_path, bad)
    with caplog.at_level(logging.ERROR, logger="fedmed.client"):
        reply = _send(ctx, load_config(path))
    assert reply.has_error() and reply.error.code == ERROR_CODES["site-data"]
    reason = reply.error.reason
    _assert_clean(reason, *records["patient_id"], str(bad), "records.csv")
    assert "site=hospital_a" in reason and "site's data failed validation" in reason
    ref = reason.split("ref=")[1][:12]
    # The site's own log holds the details (file, column, line numbers) under that reference.
    local = "\n".join(r.getMessage() + str(r.exc_info[1] if r.exc_info else "") for r in caplog.records)
    assert ref in local and "records.csv" in local and "'label'" in local
    assert not any(pid in local for pid in records["patient_id"])  # ... and still no id values
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["error"] == reason and audit[-1]["type"] == "train"


def _policy_cases():
    # (id, config sections, site policy, message type, extra config, expected words in the reason)
    return [
        ("label-is-id", {"data": {"label_column": "patient_id"}}, {}, "train", {},
         "data.label_column names the patient id column"),
        ("feature-is-id", {"data": {"numeric": ["age", "patient_id"]}}, {}, "train", {},
         "data.numeric names the patient id column"),
        ("id-column-swapped", {"data": {"id_column": "age"}}, {}, "train", {},
         "this site's id column is 'patient_id'"),
        ("batch-size-1", {"train": {"batch_size": 1}}, {}, "train", {}, "policy.min_batch_size"),
        ("dp-off-but-required", {"privacy": {"enabled": False}}, {"require_dp": True}, "train", {},
         "policy.require_dp"),
        ("epsilon-above-cap", {"privacy": {"enabled": True, "target_epsilon": 50.0}}, {"max_epsilon": 8.0},
         "train", {}, "policy.max_epsilon"),
        ("delta-above-cap", {"privacy": {"enabled": True, "target_delta": 0.1}}, {"max_delta": 1e-3},
         "train", {}, "policy.max_delta"),
        ("clip-above-cap", {"privacy": {"enabled": True, "max_grad_norm": 10.0}}, {"max_grad_norm": 1.0},
         "train", {}, "policy.max_grad_norm"),
        ("notes-not-allowed", {"model": {"notes": {"enabled": True}}}, {}, "train", {}, "policy.allow_notes"),
        ("steps-above-cap", {"train": {"max_steps_per_epoch": 500}, "federation": {"local_epochs": 40}}, {},
         "train", {}, "policy.max_local_steps"),
        ("message-type-not-allowed", {}, {"allowed_messages": ["train"]}, "evaluate", {},
         "policy.allowed_messages"),
        ("metrics-stay-home", {}, {"share_site_metrics": False}, "evaluate", {}, "policy.share_site_metrics"),
        ("calibration-not-allowed", {}, {"allowed_messages": ["train", "evaluate"]}, "evaluate.calibration",
         {"calibration": "fit", "temperatures": [1.0]}, "policy.allowed_messages"),
        # Cross-site validation trains a local model (which may leave) and personalisation fine-tunes
        # one: the training limits hold for them as for "train".
        ("crosssite-without-dp", {"privacy": {"enabled": False}},
         {"require_dp": True, "allowed_messages": ["train", "evaluate.crosssite"]}, "evaluate.crosssite",
         {"crosssite": "train", "epochs": 1}, "policy.require_dp"),
        ("personalize-batch-size-1", {"train": {"batch_size": 1}}, {}, "evaluate.personalize",
         {"epochs": 1}, "policy.min_batch_size"),
    ]


@pytest.mark.parametrize("sections, policy, kind, extra, expected",
                         [c[1:] for c in _policy_cases()], ids=[c[0] for c in _policy_cases()])
def test_job_outside_the_policy_is_refused_before_any_data_is_read(synth_config, tmp_path, sections,
                                                                    policy, kind, extra, expected):
    _, path = synth_config(**sections)
    ctx = _site(tmp_path, _broken_site(tmp_path), policy=policy)
    reply = _send(ctx, load_config(path), kind=kind, **extra)
    assert reply.has_error(), "the site ran a job its policy forbids"
    # policy (or budget), never site-data: the broken records.csv was not opened
    assert reply.error.code in (ERROR_CODES["policy"], ERROR_CODES["budget"]), reply.error.reason
    assert expected in reply.error.reason, reply.error.reason
    _assert_clean(reply.error.reason, str(tmp_path))
    # The coordinator may show the reason: it parses as a fedmed refusal naming the site.
    site, shown = describe_error(reply.error.reason)
    assert site == "hospital_a" and expected in shown


def test_local_steps_cap_counts_the_sites_own_training_split(synth_config, synth_root, tmp_path):
    _, path = synth_config(federation={"local_epochs": 5}, model={"variant": "record"})
    ctx = _site(tmp_path, synth_root / "hospital_a", policy={"max_local_steps": 10})
    reply = _send(ctx, load_config(path))
    assert reply.has_error() and reply.error.code == ERROR_CODES["policy"]
    assert "policy.max_local_steps" in reply.error.reason and "federation.local_epochs=5" in reply.error.reason


@pytest.mark.parametrize("extra, expected", [
    ({"calibration": "fit", "temperatures": [1.0] * 5000}, "policy.max_metric_list"),
    ({"calibration": "fit", "temperatures": [float("nan"), 1.0]}, "temperatures must be a finite number"),
    ({"calibration": "measure", "temperature": 1e9}, "temperature must be a finite number"),
], ids=["grid-too-long", "nan-temperature", "huge-temperature"])
def test_calibration_numbers_from_the_server_are_bounded(synth_config, synth_root, tmp_path, extra, expected):
    _, path = synth_config(model={"variant": "record"})
    ctx = _site(tmp_path, synth_root / "hospital_a")
    reply = _send(ctx, load_config(path), kind="evaluate.calibration", **extra)
    assert reply.has_error() and reply.error.code == ERROR_CODES["policy"] and expected in reply.error.reason


def test_job_paths_are_ignored_and_local_paths_refused(synth_config, synth_root, tmp_path):
    """A site opens only files its own config names: the job's paths are dropped or refused."""
    _, path = synth_config(model={"variant": "record"})
    cfg = load_config(path)
    evil = tmp_path / "evil-cache"
    job = job_for_sites(cfg)
    job["data"].update(cache_dir=str(evil), image_roots=["/"], root="/", num_workers=64)
    job["model"]["pretrained_path"] = "/etc/passwd"
    ctx = _site(tmp_path, synth_root / "hospital_a")
    reply = _send(ctx, cfg, job=job)
    assert not reply.has_error(), reply.error.reason
    assert not evil.exists()
    from fedmed.client.site import _CACHE

    rt = next(iter(_CACHE.values()))
    assert rt.cfg.data.image_roots == [] and rt.cfg.data.num_workers == 0
    assert rt.cfg.model.pretrained_path is None and rt.cfg.data.cache_dir != str(evil)
    job["model"]["notes"]["tokenizer_dir"] = "/etc"
    reply = _send(_site(tmp_path, _broken_site(tmp_path), policy={"allow_notes": True}), cfg, job=job)
    assert reply.has_error() and "model.notes.tokenizer_dir names a path" in reply.error.reason


def test_federation_id_cannot_name_a_path(synth_config, synth_root, tmp_path):
    """The federation id names the site's DP ledger file: a path in it is refused."""
    _, path = synth_config(privacy={"enabled": True}, model={"variant": "record"})
    ctx = _site(tmp_path, synth_root / "hospital_a")
    reply = _send(ctx, load_config(path), **{"federation-id": "../../escaped"})
    assert reply.has_error() and "federation-id must be" in reply.error.reason
    assert not list(tmp_path.rglob("escaped*"))


def test_other_fedmed_version_is_refused_as_unapproved(synth_config, tmp_path):
    _, path = synth_config()
    cfg = load_config(path)
    job = {**job_for_sites(cfg), "fedmed_version": "9.9.9"}
    reply = _send(_site(tmp_path, _broken_site(tmp_path)), cfg, job=job)
    assert reply.has_error() and reply.error.code == ERROR_CODES["app-refused"]


def test_guard_never_forwards_a_handlers_own_error_text(tmp_path, synth_root):
    ctx = _site(tmp_path, synth_root / "hospital_a")

    def raises(msg, ctx):
        raise ValueError("cannot read /data/hospital_a/images/hospital_a-p0001.dcm for hospital_a-p0001")

    def error_text(msg, ctx):
        return Message(Error(code=0, reason="patient hospital_a-p0002 broke"), reply_to=msg)

    for handler, kind in ((raises, "internal"), (error_text, "guard")):
        reply = privacy_guard(_message("train", RecordDict()), ctx, handler)
        assert reply.has_error() and reply.error.code == ERROR_CODES[kind]
        _assert_clean(reply.error.reason, "hospital_a-p0001", "hospital_a-p0002", "/data")


def test_coordinator_keeps_no_text_it_cannot_vouch_for():
    """Defence in depth: an old site's or Flower's own exception text is withheld at the server."""
    leaky = _message("train", RecordDict())
    reply = Message(Error(code=0, reason="<class 'ValueError'>:<'ids P-0001, P-0002'>"), reply_to=leaky)
    good = Message(Error(code=ERROR_CODES["policy"], reason=error_reason(
        "policy", new_ref(), site="hospital_b", public="train.batch_size=1 is below this site's minimum 16")),
        reply_to=leaky)
    _, rejected = screen_train_replies([reply, good], pack({}))
    texts = {r.site: r.reason for r in rejected}
    assert not any("P-0001" in t for t in texts.values())
    assert "train.batch_size=1" in texts["hospital_b"]
    per_site, failed = screen_metric_replies([reply])
    assert per_site == {} and "withheld" in next(iter(failed.values()))
    # A public text with a path or odd characters is dropped at both ends.
    assert error_reason("policy", new_ref(), public="see /etc/passwd").count("/") == 1
    assert describe_error("fedmed/policy ref=0123456789ab: /home/x/P-0001.dcm")[1].endswith(")")


def test_metrics_lists_beyond_the_policy_are_blocked(tmp_path, synth_root):
    ctx = _site(tmp_path, synth_root / "hospital_a", policy={"max_metric_list": 4})

    def long_list(msg, ctx):
        return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 3, "x": [0.0] * 10})}),
                       reply_to=msg)

    reply = privacy_guard(_message("train", RecordDict()), ctx, long_list)
    assert reply.has_error() and reply.error.code == ERROR_CODES["guard"]


def test_a_public_key_reply_is_audited(tmp_path, synth_root):
    """The secure-aggregation key reply (bytes) is logged by size and fingerprint, and sent."""
    from fedmed.messages import SECAGG_KEY, SITE_KEY

    ctx = _site(tmp_path, synth_root / "hospital_a")

    def key_reply(msg, ctx):
        return Message(content=RecordDict({SECAGG_KEY: ConfigRecord({"stage": "keys", "enc-key": b"k" * 32,
                                                                     "mask-key": b"m" * 32, "signature": b"s" * 104}),
                                           SITE_KEY: ConfigRecord({"name": "hospital_a"})}), reply_to=msg)

    reply = privacy_guard(_message("query", RecordDict()), ctx, key_reply)
    assert not reply.has_error()
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert entry[SECAGG_KEY]["enc-key"]["bytes"] == 32 and entry[SECAGG_KEY]["signature"]["bytes"] == 104


@pytest.mark.parametrize("swap", ["config", "arrays"])
def test_a_record_of_the_wrong_kind_is_refused_in_words(synth_config, synth_root, tmp_path, swap):
    """A hostile coordinator puts a MetricRecord where the config or the weights belong."""
    _, path = synth_config()
    cfg = load_config(path)
    config = ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), "lr": 1e-3, "federation-id": "t",
                           "server-round": 1})
    content = RecordDict({"arrays": pack(model_from_config(cfg).state_dict()), "config": config})
    content[swap] = MetricRecord({"x": 1.0})
    reply = app(_message("train", content), _site(tmp_path, synth_root / "hospital_a"))
    assert reply.has_error() and reply.error.code == ERROR_CODES["policy"], reply.error.reason
    expected = "is not a ConfigRecord" if swap == "config" else "arrays are not an ArrayRecord"
    assert expected in reply.error.reason
    _assert_clean(reply.error.reason, str(tmp_path))
