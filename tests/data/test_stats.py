"""Federated statistics: no cell below k and no row-level value leaves a site.

The site side (:func:`fedmed.stats.site_statistics`) on a real site folder, the real
ClientApp handler behind the site's guard with a hostile request (k=1, bad numbers), and
the pooled view. Over real SuperNodes: tests/server/test_stats_deployment.py; in simulation:
test_stats_in_simulation below (slow).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedmed.config import FedmedConfig
from fedmed.data.site import load_site
from fedmed.job import job_for_sites
from fedmed.messages import CONFIG_KEY, JOB_KEY, STATS_ACTION, describe_error, encode_job
from fedmed.stats import SUPPRESSED, StatsRequest, hist_quantiles, pool_statistics, site_statistics


def _values(stats: dict) -> list[float]:
    return [float(x) for v in stats.values() for x in (v if isinstance(v, list) else [v])]


def _counts(stats: dict) -> list[float]:
    return [float(x) for key, v in stats.items()
            if not key.endswith((".mean", ".std")) and not key.startswith(("stats.", "privacy."))
            for x in (v if isinstance(v, list) else [v])]


@pytest.fixture
def site(make_site, data_cfg):
    cfg = data_cfg.model_copy(update={"ranges": {"age": (0.0, 120.0), "bp": (60.0, 200.0)}})
    return load_site(make_site(), cfg), cfg


def test_no_cell_below_k_and_the_floor_is_the_sites(site):
    loaded, cfg = site
    for asked in (1, 2, 5):  # a hostile server asks for k=1: it gets the site's floor 5
        stats = site_statistics(loaded, cfg, request=StatsRequest(k=asked), site_k=5)
        assert stats["stats.k"] == 5
        assert all(v == SUPPRESSED or v == 0 or v >= 5 for v in _counts(stats)), stats
    # The server may ask for more.
    stats = site_statistics(loaded, cfg, request=StatsRequest(k=12), site_k=5)
    assert stats["stats.k"] == 12 and all(v == SUPPRESSED or v == 0 or v >= 12 for v in _counts(stats))
    # Secondary suppression: no group that sums to a released total has exactly one hidden cell.
    groups = [[stats[f"num.{c}.missing"], *stats[f"num.{c}.hist"]] for c in cfg.numeric]
    groups += [[*stats[f"cat.{c}"], stats[f"cat.{c}.unknown"], stats[f"cat.{c}.missing"]]
               for c in cfg.categorical]
    groups.append(stats["label"])
    assert any(SUPPRESSED in g for g in groups)  # the case is exercised
    assert all(sum(1 for x in g if x == SUPPRESSED) != 1 for g in groups), groups


def test_no_row_level_value_leaves(site, make_site):
    loaded, cfg = site
    stats = site_statistics(loaded, cfg, request=StatsRequest(k=1), site_k=5)
    records = pd.read_csv(make_site("raw") / "records.csv", dtype=str)
    ages = pd.to_numeric(records["age"], errors="coerce").dropna()
    bps = pd.to_numeric(records["bp"], errors="coerce").dropna()
    # Counts are whole numbers (one may equal some age by chance: no leak); the only other
    # numbers are means/stds over >= k values — never a patient's minimum or maximum.
    assert all(float(v).is_integer() for k, val in stats.items() if not k.endswith((".mean", ".std"))
               for v in (val if isinstance(val, list) else [val]))
    summaries = {v for k, v in stats.items() if k.endswith((".mean", ".std"))}
    for col in (ages, bps):
        assert col.min() not in summaries and col.max() not in summaries
    assert not any(isinstance(k, str) and "SECRET" in k for k in stats)
    assert all(np.isfinite(_values(stats)))
    assert stats["n.patients"] == 42 and stats["label"] == [33.0, 18.0]  # 51 samples
    assert abs(stats["num.age.mean"] - ages.mean()) < 1e-9  # over >= k values: allowed


def test_too_few_patients_refuses(make_site, data_cfg):
    records = pd.read_csv(make_site("base") / "records.csv", dtype=str).iloc[:4]
    small = load_site(make_site("small", records=records, images=None), data_cfg)
    with pytest.raises(ValueError, match="fewer than k=5 patients"):
        site_statistics(small, data_cfg, request=StatsRequest(k=1), site_k=5)


def test_noise_reports_epsilon_and_hides_exact_means(site):
    loaded, cfg = site
    exact = site_statistics(loaded, cfg, request=StatsRequest(), site_k=5)
    noisy = site_statistics(loaded, cfg, request=StatsRequest(epsilon=1.0), site_k=5, seed=3)
    assert noisy["privacy.epsilon"] == 1.0 and "num.age.mean" not in noisy
    assert noisy["n.patients"] != exact["n.patients"]


def test_pooling_and_quantiles():
    edges = [0.0, 10.0, 20.0, 30.0, 40.0]
    assert hist_quantiles([0, 10, 10, 10, 10, 0], edges)["q50"] == pytest.approx(20.0)
    cfg = FedmedConfig.model_validate({"data": {"classes": ["a", "b"], "numeric": ["x"],
                                                "ranges": {"x": [0, 40]}}}).data
    a = {"n.patients": 10.0, "label": [6.0, SUPPRESSED], "num.x.hist": [0, 5, 5, 0, 0, 0],
         "num.x.mean": 10.0, "num.x.std": 5.0, "n.records": 10.0}
    b = {"n.patients": 20.0, "label": [10.0, 10.0], "num.x.hist": [0, 0, 0, 10, 10, 0],
         "num.x.mean": 30.0, "num.x.std": 5.0, "n.records": 20.0}
    pooled = pool_statistics({"a": a, "b": b}, cfg, bins=4)
    assert pooled["counts"]["n.patients"] == 30 and pooled["counts"]["label"] == [16.0, 10.0]
    assert pooled["suppressed_cells"] == {"label": 1}
    num = pooled["numeric"]["x"]
    assert num["mean"] == pytest.approx((10 * 10 + 30 * 20) / 30) and num["q50"] == pytest.approx(25.0)


def _message(cfg: FedmedConfig, **request) -> Message:
    record = ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), **request})
    md = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                  message_type=f"{MessageType.QUERY}.{STATS_ACTION}")
    return Message(metadata=md, content=RecordDict({CONFIG_KEY: record}))


def _context(site_yaml) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml),
                                                     "audit-log": str(site_yaml.parent / "audit.jsonl")},
                   state=RecordDict(), run_config={})


def _site_yaml(tmp_path, site_dir, **policy):
    import yaml

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"site": "hospital_x", "data_dir": str(site_dir), "device": "cpu",
                                    "policy": policy}))
    return path


@pytest.mark.parametrize("request_, floor", [({"stats-k": 1}, 5), ({"stats-k": 2}, 8)])
def test_handler_behind_the_guard_applies_the_site_floor(make_site, data_cfg, tmp_path, secret,
                                                         request_, floor):
    """The real ClientApp, message in, reply out, through the site's guard and audit log."""
    from fedmed.client.app import app

    site_dir = make_site()
    cfg = FedmedConfig.model_validate({"data": data_cfg.model_dump(mode="json")})
    ctx = _context(_site_yaml(tmp_path, site_dir, stats_min_count=floor))
    reply = app(_message(cfg, **request_), ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["stats.k"] == floor
    assert all(v == SUPPRESSED or v == 0 or v >= floor for v in _counts(metrics))
    audit = (tmp_path / "audit.jsonl").read_text()
    assert "query.statistics" in audit and secret not in audit and secret not in json.dumps(metrics)


@pytest.mark.parametrize("request_, words", [({"stats-bins": 10_000}, "bins must be in"),
                                              ({"stats-epsilon": 1e9}, "epsilon must be in")])
def test_handler_refuses_bad_requests_with_a_public_reason(make_site, data_cfg, tmp_path, request_, words):
    from fedmed.client.app import app

    cfg = FedmedConfig.model_validate({"data": data_cfg.model_dump(mode="json")})
    reply = app(_message(cfg, **request_), _context(_site_yaml(tmp_path, make_site())))
    assert reply.has_error()
    kind, text = describe_error(reply.error.reason)
    assert words in text, reply.error.reason


def test_policy_can_close_statistics(make_site, data_cfg, tmp_path):
    from fedmed.client.app import app

    cfg = FedmedConfig.model_validate({"data": data_cfg.model_dump(mode="json")})
    ctx = _context(_site_yaml(tmp_path, make_site(), allowed_messages=["train", "evaluate"]))
    reply = app(_message(cfg, **{"stats-k": 5}), ctx)
    assert reply.has_error() and "query.statistics is not allowed" in reply.error.reason


@pytest.mark.slow
def test_stats_in_simulation(make_site, data_cfg, tmp_path):
    """``fedmed stats`` end to end in Flower's simulation engine: two sites, JSON and HTML."""
    import yaml

    from fedmed.cli import main

    make_site("north")
    make_site("south")
    data = data_cfg.model_dump(mode="json")
    data.update(root=str(tmp_path), sites=["north", "south"], ranges={"age": [0, 120], "bp": [60, 200]})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "stats-sim", "data": data}))
    out = tmp_path / "stats"
    assert main(["stats", "-c", str(cfg), "--out", str(out), "--k", "1", "--cpus", "2"]) == 0
    res = json.loads((out / "stats.json").read_text())
    assert sorted(res["sites"]) == ["north", "south"] and res["failed"] == {}
    for stats in res["sites"].values():
        assert stats["stats.k"] == 5 and all(v == SUPPRESSED or v == 0 or v >= 5 for v in _counts(stats))
    assert res["pooled"]["counts"]["n.patients"] == 84 and (out / "stats.html").exists()
