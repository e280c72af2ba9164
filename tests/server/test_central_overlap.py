"""federation.central_overlap: round N is scored centrally while round N+1 trains, with the same numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import load_config
from fedmed.server.central import make_central_eval
from fedmed.server.checkpoint import load_state
from fedmed.server.federation import run_federation

SITES = ["hospital_a", "hospital_b", "hospital_c"]
_spec = importlib.util.spec_from_file_location(
    "simulate_tests", Path(__file__).resolve().parents[1] / "experiments" / "test_simulate.py")
_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower's runtimes for a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1)


def _run(synth_config, synth_root, out: Path, *, rounds: int = 3, **federation):
    _, path = synth_config(federation={"rounds": rounds, "local_epochs": 1, "calibration": "off", **federation},
                           train={"max_steps_per_epoch": 2})
    cfg = load_config(path)
    events: list[tuple[str, int, float | None]] = []
    state = run_federation(
        _sim._InProcessGrid(synth_root, SITES), cfg, out_dir=out, central_eval=make_central_eval(cfg),
        on_round=lambda row, _s: events.append(("round", row["round"], row.get("central_val_auc"))),
        on_pushed=lambda rnd: events.append(("pushed", rnd, None)))
    return state, events


def _central(row):
    return {k: v for k, v in row.items() if k.startswith("central_")}


def test_overlapped_scoring_gives_the_inline_numbers_in_order(synth_config, synth_root, tmp_path):
    inline, ev_inline = _run(synth_config, synth_root, tmp_path / "inline", central_overlap=False)
    over, ev_over = _run(synth_config, synth_root, tmp_path / "overlap", central_overlap=True)
    assert [_central(r) for r in over.history] == [_central(r) for r in inline.history]
    assert all(r["central_val_auc"] == r["central_val_auc"] for r in over.history)  # scored, not NaN
    assert (over.best_round, over.best_score) == (inline.best_round, inline.best_score)
    assert all(np.array_equal(over.arrays[k], inline.arrays[k]) for k in inline.arrays)
    for name in ("best_model.pt", "last_model.pt"):
        a = torch.load(tmp_path / "overlap" / name, weights_only=True)
        b = torch.load(tmp_path / "inline" / name, weights_only=True)
        assert a["round"] == b["round"] and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    # every round is reported once, in order, with its central score; round N's report comes
    # after round N+1's messages are out (that is the overlap), the last one before the end
    assert [e for e in ev_over if e[0] == "round"] == [e for e in ev_inline if e[0] == "round"]
    assert [e[:2] for e in ev_over] == [("pushed", 1), ("pushed", 2), ("round", 1), ("pushed", 3), ("round", 2),
                                        ("round", 3)]
    assert [e[:2] for e in ev_inline] == [("pushed", 1), ("round", 1), ("pushed", 2), ("round", 2), ("pushed", 3),
                                          ("round", 3)]
    # the timing says where the scoring ran: beside the next round (0 s on the path), the last inline
    for r in over.history[:-1]:
        assert r["timing"]["central_eval"] == 0.0 and r["timing"]["central_eval_overlapped"] > 0
    assert "central_eval_overlapped" not in over.history[-1]["timing"]
    assert all("central_eval_overlapped" not in r["timing"] for r in inline.history)
    assert load_state(tmp_path / "overlap").history == over.history


def test_early_stopping_keeps_scoring_inline(synth_config, synth_root, tmp_path):
    # its decision after round N must come before round N+1 is sent (a site's DP budget is spent then)
    state, events = _run(synth_config, synth_root, tmp_path / "es", rounds=2, early_stopping_rounds=5)
    assert [e[:2] for e in events] == [("pushed", 1), ("round", 1), ("pushed", 2), ("round", 2)]
    assert all("central_eval_overlapped" not in r["timing"] for r in state.history)


class _FailingGrid(_sim._InProcessGrid):
    """Delivers round 1, then loses every site when round 2's training is sent."""

    def __init__(self, root: Path, sites: list[str]) -> None:
        super().__init__(root, sites)
        self.trains = 0

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == 2:
                raise ConnectionError("the SuperLink went away")
        return super().push_messages(messages)


def test_a_failed_next_round_still_saves_the_scored_round(synth_config, synth_root, tmp_path):
    _, path = synth_config(federation={"rounds": 3, "local_epochs": 1, "calibration": "off"},
                           train={"max_steps_per_epoch": 2})
    cfg = load_config(path)
    out = tmp_path / "run"
    reported: list[int] = []
    with pytest.raises(ConnectionError):
        run_federation(_FailingGrid(synth_root, SITES), cfg, out_dir=out, central_eval=make_central_eval(cfg),
                       on_round=lambda row, _s: reported.append(row["round"]))
    saved = load_state(out)
    assert saved.round == 1 and reported == [1] and saved.best_round == 1
    assert "central_val_auc" in saved.history[0]
    assert torch.load(out / "best_model.pt", weights_only=True)["round"] == 1


class _Clock:
    """time.monotonic/sleep for collect_replies: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 3))
        self.now += s


class _LateGrid:
    """Two replies: one at once, the last after ``at`` seconds of the clock."""

    def __init__(self, clock: _Clock, at: float) -> None:
        self.clock, self.at, self.pulls = clock, at, 0

    def pull_messages(self, ids):
        from types import SimpleNamespace

        self.pulls += 1
        ready = {"a"} | ({"b"} if self.clock.now >= self.at else set())
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ready & set(ids))]


@pytest.mark.parametrize(("expect", "at", "pulls"), [
    (None, 1.99, 11),   # no estimate: every 0.2 s (round 1)
    (10.0, 11.99, 57),  # 0.5 s apart, closing in from 5 s before the expected time, then 0.1 s apart
    (10.0, 9.0, 27),    # a round faster than expected is still taken within a few pulls
])
def test_collect_replies_pulls_slowly_until_the_last_reply_is_expected(monkeypatch, expect, at, pulls):
    from fedmed.server import federation

    clock = _Clock()
    monkeypatch.setattr(federation.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(federation.time, "sleep", clock.sleep)
    grid = _LateGrid(clock, at=at)
    got = federation.collect_replies(grid, {"a", "b"}, timeout=60, expect=expect)
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["a", "b"]
    assert grid.pulls == pulls
    if expect is None:
        assert clock.sleeps == [0.2] * 10
    else:  # slow while the reply is far off, never slower as it nears, never faster than LAST_POLL
        assert clock.sleeps[:10] == [0.5] * 10
        assert clock.sleeps == sorted(clock.sleeps, reverse=True) and min(clock.sleeps) >= 0.1
    # the last reply is taken within one pull of its arrival (a tenth of the time still expected)
    assert clock.now - at <= max(0.2 if expect is None else 0.1, 0.1 * ((expect or 0) - at)) + 1e-6
