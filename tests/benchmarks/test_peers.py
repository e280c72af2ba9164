"""The peers benchmark's own parts: the job it gives the peers, its memory sampler, its doc blocks.

The timed runs themselves are not in the suite (``make bench-peers``); these check that the
peers get fedmed's schedule and that a doc rewrite keeps the peers' and DP-cost sections.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.peers import run as peers_run
from benchmarks.peers.report import marked_blocks, update_doc

ROOT = Path(__file__).resolve().parents[2]


def _peer_task():
    path = ROOT / "benchmarks" / "peers" / "flower_app" / "fedmedpeer" / "task.py"
    spec = importlib.util.spec_from_file_location("fedmedpeer_task", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rounds", [1, 4, 20])
def test_peer_learning_rate_is_fedmeds_schedule(rounds):
    from fedmed.config import load_config
    from fedmed.server.federation import round_lr

    cfg = load_config(ROOT / "configs" / "default.yaml", [f"federation.rounds={rounds}"])
    task = _peer_task()
    assert [task.round_lr(cfg, r) for r in range(1, rounds + 1)] == pytest.approx(
        [round_lr(cfg, r) for r in range(1, rounds + 1)], rel=1e-12)


def test_sampler_sees_children_and_marked_daemons():
    marker = f"fedmed-peers-test-{os.getpid()}"
    # a detached process (own session), found only by the marker in its command line
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker], start_new_session=True)
    try:
        procs = peers_run._procs()
        assert daemon.pid in peers_run._tree(os.getpid(), procs, marker)
        assert daemon.pid in peers_run._tree(os.getpid(), procs, None)  # still our child here
        assert daemon.pid not in peers_run._tree(1 << 22, procs, None)  # an unknown root finds nothing
        assert peers_run.rss_mb({os.getpid()}) > 10
    finally:
        daemon.kill()
        daemon.wait()


def test_update_doc_replaces_only_its_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept text\n\n<!-- peers:begin -->\nSTALE-BLOCK\n<!-- peers:end -->\n")
    res = {"job": {"rounds": 4, "local_epochs": 3, "image_size": 64}, "sites": ["a", "b"], "repeats": 1,
           "summary": {n: {"wall_s": w, "wall_all": [w], "peak_rss_mb": 1000.0, "bytes_per_reply": b,
                           "central_test_auc": [auc], "load_before": [0.5]}
                       for n, w, b, auc in (("fedmed_simulation", 50.0, None, 0.85), ("flower", 60.0, 1.6e6, 0.85),
                                            ("nvflare", 40.0, 1.7e6, 0.80))}}
    update_doc(doc, peers=res)
    text = doc.read_text()
    assert "kept text" in text and "STALE-BLOCK" not in text and text.count("<!-- peers:begin -->") == 1
    assert "fedmed, simulation vs plain Flower app: wall ratio **0.83**, |ΔAUC| 0.0000 → met" in text
    # slower than FLARE and not at equal AUC: both are misses
    assert "fedmed, simulation vs NVIDIA FLARE 2.9: wall ratio **1.25**, |ΔAUC| 0.0500 → **missed**" in text
    update_doc(doc, peers=res)  # idempotent
    assert doc.read_text() == text


def test_benchmark_rewrite_keeps_marked_blocks(tmp_path):
    from benchmarks.__main__ import write_doc

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# old\n\n<!-- peers:begin -->\nP\n<!-- peers:end -->\n\n"
                   "<!-- dp_cost:begin -->\nD\n<!-- dp_cost:end -->\n")
    mach = dict.fromkeys(("cpu", "cores", "memory_gb", "gpu", "os", "python", "torch", "flwr", "commit",
                          "load_before"), "x")
    write_doc({}, mach, doc, command="make bench", total_s=1.0)
    text = doc.read_text()
    assert "# old" not in text
    assert marked_blocks(text) == ["<!-- peers:begin -->\nP\n<!-- peers:end -->",
                                   "<!-- dp_cost:begin -->\nD\n<!-- dp_cost:end -->"]


def test_the_real_data_job_writes_its_own_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- peers:begin -->\nSYNTHETIC-JOB\n<!-- peers:end -->\n")
    res = {"job": {"name": "heart", "rounds": 20, "local_epochs": 5, "image_size": 64},
           "sites": ["cleveland", "hungarian", "switzerland", "va"], "repeats": 2, "model_bytes": 123_456,
           "summary": {n: {"wall_s": w, "wall_all": [w, w], "peak_rss_mb": 900.0, "bytes_per_reply": b,
                           "central_test_auc": [0.9, 0.9], "load_before": [0.5, 0.6]}
                       for n, w, b in (("fedmed_deployment", 45.0, 123_500), ("nvflare", 50.0, 124_000))}}
    update_doc(doc, peers=res)
    text = doc.read_text()
    assert "SYNTHETIC-JOB" in text  # the synthetic job's block is another job's: left alone
    (heart,) = [b for b in marked_blocks(text) if b.startswith("<!-- peers_heart:begin -->")]
    assert "real data: UCI heart disease" in heart and "--job heart --repeats 2" in heart
    assert "all 4 before round 1, `federation.min_sites=4`" in heart and "123,456 bytes fp32" in heart
    assert "fedmed, deployment vs NVIDIA FLARE 2.9: wall ratio **0.90**, |ΔAUC| 0.0000 → met" in heart
    update_doc(doc, peers=res)
    assert doc.read_text() == text


def test_flowers_deployment_is_compared_with_fedmeds_deployments_only(tmp_path):
    """The opt-in Flower-deployment arm is the like-for-like peer of fedmed's deployment: its row is
    written and compared with the deployment arms, not with fedmed's simulation."""
    doc = tmp_path / "benchmarks.md"
    res = {"job": {"name": "heart", "rounds": 20, "local_epochs": 5, "image_size": 64},
           "sites": ["a", "b"], "repeats": 1, "model_bytes": 1000,
           "summary": {n: {"wall_s": w, "wall_all": [w], "peak_rss_mb": 900.0, "bytes_per_reply": None,
                           "central_test_auc": [0.9], "load_before": [0.5]}
                       for n, w in (("fedmed_deployment", 80.0), ("fedmed_simulation", 70.0),
                                    ("flower_deployment", 400.0))}}
    update_doc(doc, peers=res)
    text = doc.read_text()
    assert "| plain Flower app, deployment (Flower's SuperLink + SuperNodes, loopback) | **400.0** |" in text
    assert "fedmed, deployment vs plain Flower app, deployment: wall ratio **0.20**, |ΔAUC| 0.0000 → met" in text
    assert "fedmed, simulation vs plain Flower app, deployment" not in text
    assert "`--only flower_deployment ...`" in text
    assert "flower_deployment" in peers_run.EXTRA_RUNS and "flower_deployment" not in peers_run.RUNS


def test_flower_deployment_driver_stops_what_it_started():
    """The Flower-deployment driver ends each process it started with the children in its session
    (a SuperNode's `flwr-clientapp`s), so no run leaves Flower processes behind."""
    spec = importlib.util.spec_from_file_location(
        "flower_deployment", ROOT / "benchmarks" / "peers" / "flower_deployment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        " print(c.pid, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    mod._stop([parent])
    assert parent.poll() is not None
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the started process's child survived")


def test_heart_cohort_holds_out_a_stratified_quarter_of_every_hospital(tmp_path, shared_data):
    import pandas as pd

    from benchmarks.common import cohort_sites, heart_cohort

    root = heart_cohort(tmp_path / "heart", src=shared_data / "uci-heart-disease")
    assert cohort_sites(root) == ["cleveland", "hungarian", "switzerland", "va"]
    assert (root / "fedmed-data.yaml").exists() and not (tmp_path / "heart.import").exists()
    read = lambda p: pd.read_csv(p, dtype=str, keep_default_na=False)  # noqa: E731
    sites = {s: read(root / s / "records.csv") for s in cohort_sites(root)}
    central = read(root / "central" / "records.csv")
    assert sum(map(len, sites.values())) + len(central) == 303 + 294 + 123 + 200  # the four UCI files
    assert not set(central["patient_id"]) & set(pd.concat(sites.values())["patient_id"])
    for site, kept in sites.items():
        held = central[central["patient_id"].str.startswith(f"{site}-")]
        assert len(held) == pytest.approx((len(kept) + len(held)) / 4, abs=1)
        for label in ("no_disease", "disease"):  # each label split 3 : 1 as well
            k, h = (kept["label"] == label).sum(), (held["label"] == label).sum()
            assert h == pytest.approx((k + h) / 4, abs=1), (site, label)
    # rows are the importer's, value for value (missing cells stay empty), and the split repeats
    from fedmed.data.importers.heart_disease import import_heart_disease

    import_heart_disease(shared_data / "uci-heart-disease", tmp_path / "plain")
    plain = read(tmp_path / "plain" / "va" / "records.csv").set_index("patient_id")
    mine = pd.concat([sites["va"], central]).set_index("patient_id")
    assert plain.equals(mine.loc[plain.index])
    again = heart_cohort(tmp_path / "again", src=shared_data / "uci-heart-disease")
    assert (again / "central" / "records.csv").read_text() == (root / "central" / "records.csv").read_text()
