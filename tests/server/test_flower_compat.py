"""server/flower_compat.py: the ServerApp's object pulls use a short backoff, or Flower's own with a reason."""

from __future__ import annotations

import functools
import importlib

import pytest

from fedmed.server import flower_compat


def test_reply_pulls_get_the_short_backoff_once_and_still_pull(monkeypatch):
    grid = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.setattr(grid, "pull_objects", grid.pull_objects)  # restored after the test
    original = grid.pull_objects
    assert flower_compat.shorten_reply_pulls() is None
    patched = grid.pull_objects
    assert isinstance(patched, functools.partial) and patched.func is original
    assert patched.keywords == {"initial_backoff": flower_compat.PULL_BACKOFF,
                                "backoff_cap": flower_compat.PULL_BACKOFF_CAP}
    assert flower_compat.shorten_reply_pulls() is None and grid.pull_objects is patched  # not wrapped twice
    # still Flower's pull: every object asked for, retried while unavailable
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    asked: list[str] = []

    def pull_one(object_id: str) -> bytes:
        asked.append(object_id)
        if asked.count(object_id) < 3:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    assert patched(object_ids=["a", "b"], pull_object_fn=pull_one) == {"a": b"a", "b": b"b"}
    assert sorted(asked) == ["a"] * 3 + ["b"] * 3


def test_a_moved_grid_is_left_as_flower_ships_it_with_a_reason(monkeypatch):
    grid = importlib.import_module("flwr.superlink.grid.http_grid")

    def pull_objects(object_ids, pull_object_fn):  # a release without the backoff arguments
        return {}

    monkeypatch.setattr(grid, "pull_objects", pull_objects)
    assert "no longer takes initial_backoff" in flower_compat.shorten_reply_pulls()
    assert grid.pull_objects is pull_objects
    monkeypatch.delattr(grid, "pull_objects")
    assert "pull_objects is missing" in flower_compat.shorten_reply_pulls()


def test_this_flower_has_what_the_warm_serverapp_runner_needs():
    assert flower_compat.check_runner() is None


def test_a_flower_without_it_makes_the_runner_step_aside_with_a_reason(monkeypatch):
    import subprocess
    import sys

    from fedmed.server.warm import RUNNER_UNSUPPORTED

    monkeypatch.setenv("FEDMED_SERVER_COMPAT_REQUIRE", "flwr.superlink.gone_in_next_release:run_serverapp")
    assert flower_compat.check_runner() == ("flwr.superlink.gone_in_next_release.run_serverapp is missing "
                                            "(ModuleNotFoundError)")
    # The runner itself exits with the code fedmed-server answers by starting Flower's SuperExec.
    res = subprocess.run([sys.executable, "-m", "fedmed.server.warm", "--runtime-api-address", "127.0.0.1:9",
                          "--timeout", "5"], capture_output=True, text=True, timeout=120)
    assert res.returncode == RUNNER_UNSUPPORTED, res.stderr
    assert "gone_in_next_release" in res.stderr and "Flower's SuperExec runs the ServerApp instead" in res.stderr


def test_the_runner_gives_up_when_no_run_comes():
    from fedmed.server.warm import wait_for_task

    with pytest.raises(TimeoutError, match="no run reached this runner"):
        wait_for_task("127.0.0.1:9", root_certificates=None, timeout=1.0)  # nothing listens on port 9
