"""The peers benchmark's own parts: the job it gives the peers, its memory sampler, its doc blocks.

The timed runs themselves are not in the suite (``make bench-peers``); these check that the
peers get fedmed's schedule and that a doc rewrite keeps the peers' and DP-cost sections.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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
