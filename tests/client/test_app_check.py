"""The site's app allow-list and its Flower compatibility checks, without a federation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

import fedmed
from fedmed.client import flower_compat
from fedmed.client.approval import AppRefused, check_fab
from fedmed.flower import write_app_dir

BIN = Path(sys.executable).parent


def _fab(tmp_path: Path, *, edit=None, extra: dict[str, str] | None = None) -> bytes:
    app = write_app_dir(tmp_path / "app")
    if edit is not None:
        toml = app / "pyproject.toml"
        toml.write_text(edit(toml.read_text()))
    for name, text in (extra or {}).items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return build_fab_from_disk(app)


def test_the_installed_fedmed_app_is_accepted(tmp_path):
    check_fab(_fab(tmp_path))


@pytest.mark.parametrize(("case", "edit", "extra", "says"), [
    ("code file", None, {"fedmed/client/app.py": "app = None\n"}, "files other than pyproject.toml"),
    ("foreign clientapp", lambda t: t.replace('clientapp = "fedmed.client.app:app"', 'clientapp = "evil:app"'),
     None, "components are not the allow-listed"),
    ("foreign serverapp", lambda t: t.replace('serverapp = "fedmed.server.app:app"', 'serverapp = "x:app"'),
     None, "components are not the allow-listed"),
    ("other version", lambda t: t.replace(f'version = "{fedmed.__version__}"', 'version = "9.9.9"'),
     None, "version differs"),
    ("dependencies", lambda t: t.replace("dependencies = []", 'dependencies = ["requests"]'),
     None, "declares dependencies"),
])
def test_anything_else_is_refused_with_fixed_public_text(tmp_path, case, edit, extra, says):
    with pytest.raises(AppRefused) as info:
        check_fab(_fab(tmp_path, edit=edit, extra=extra))
    assert says in info.value.public
    # The public text names no file and no value from the bundle (those go to the site log).
    for leak in ("evil", "9.9.9", "requests", "app.py"):
        assert leak not in info.value.public


def test_a_bundle_that_is_not_a_zip_is_refused():
    with pytest.raises(AppRefused, match="not a readable FAB"):
        check_fab(b"PK\x03\x04 definitely not a zip")


def test_compat_checks_pass_on_the_pinned_flower_and_fail_when_a_piece_is_gone(monkeypatch):
    assert flower_compat.check_warm() is None
    assert flower_compat.check_gate() is None
    monkeypatch.setenv("FEDMED_COMPAT_REQUIRE", "flwr.supercore.gone_in_next_release:Thing")
    assert "flwr.supercore.gone_in_next_release.Thing is missing" in flower_compat.check_warm()
    assert flower_compat.check_gate() is None  # the fallback does not need that piece
    monkeypatch.setenv("FEDMED_COMPAT_REQUIRE_GATE", "flwr.supernode.runtime.run_clientapp:gone")
    assert "run_clientapp.gone is missing" in flower_compat.check_gate()


def test_site_refuses_to_start_when_it_cannot_check_apps(tmp_path):
    """Neither the warm runner nor the gated Flower ClientApp: no node starts, one clear line."""
    data = tmp_path / "data"
    data.mkdir()
    env = dict(os.environ, FEDMED_COMPAT_REQUIRE="flwr.supercore.gone:Thing",
               FEDMED_COMPAT_REQUIRE_GATE="flwr.supernode.gone:Thing")
    res = subprocess.run([str(BIN / "fedmed-client"), "--site", "hospital_a", "--data-dir", str(data),
                          "--insecure", "--server", "127.0.0.1:9", "--work-dir", str(tmp_path / "work")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "refusing to start rather than run unapproved code" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "work" / "supernode.log").exists()  # no SuperNode was started


def test_an_exception_in_the_app_leaves_as_code_and_reference_only(caplog):
    from flwr.app import Message, Metadata, RecordDict

    from fedmed.client.refusals import run_app_safely

    meta = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    request = Message(RecordDict(), metadata=meta)

    def app(message, context):
        raise ValueError("label column holds P-000123, P-000456 in /srv/site/records.csv")

    with caplog.at_level("ERROR", logger="fedmed.client"):
        reply = run_app_safely(app, request, None)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("fedmed/internal ref=") and len(reason) == len("fedmed/internal ref=") + 12
    assert "P-000123" not in reason and "/srv" not in reason
    ref = reason.split("ref=")[1]
    assert ref in caplog.text and "P-000123" in caplog.text  # the full story stays in the site's log


def test_node_poll_check_passes_on_the_pinned_flower_and_fails_when_a_piece_is_gone(monkeypatch):
    assert flower_compat.check_node_poll() is None
    monkeypatch.setenv("FEDMED_COMPAT_REQUIRE_POLL", "flwr.supernode.gone:Thing")
    assert "flwr.supernode.gone.Thing is missing" in flower_compat.check_node_poll()


def test_capped_sleep_shortens_only_long_sleeps_and_passes_the_rest_of_time_through(monkeypatch):
    import time

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    capped = flower_compat._CappedSleep(0.25)
    capped.sleep(3)     # Flower's idle wait before its next request: at most the poll
    capped.sleep(0.5)   # its wait for a reply in its own state: the local look
    capped.sleep(0.01)  # shorter ones as they are
    assert slept == [0.25, flower_compat.LOCAL_WAIT, 0.01]
    slept.clear()
    flower_compat._CappedSleep(0.01).sleep(0.5)  # a poll below the local look caps both
    assert slept == [0.01]
    assert capped.time is time.time and capped.monotonic is time.monotonic


def test_site_node_command_caps_the_idle_poll_unless_told_flowers():
    from fedmed.client.cli import _node_command

    assert _node_command(0.25)[-4:] == ["fedmed.client.node", "--poll", "0.25", "--"]
    assert _node_command(3.0) == ["flower-supernode"]


@pytest.mark.parametrize("moved", [False, True])
def test_the_node_runs_flowers_own_when_its_loop_moved(moved):
    """fedmed.client.node checks Flower's loop itself (the wrapper imports no Flower): when it
    moved, one notice for the site's console and Flower's own node, unchanged."""
    env = dict(os.environ)
    if moved:
        env["FEDMED_COMPAT_REQUIRE_POLL"] = "flwr.supernode.gone:Thing"
    res = subprocess.run([sys.executable, "-m", "fedmed.client.node", "--poll", "0.25", "--", "--help"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: flower-supernode" in res.stdout  # Flower's node in both cases, here its --help
    notice = "fedmed site NOTICE: Flower's idle poll stays at 3 s (flwr.supernode.gone.Thing is missing"
    assert (notice in res.stderr) is moved


def test_node_loop_gets_capped_sleeps_and_a_short_object_backoff(monkeypatch):
    import functools
    import importlib

    mod = importlib.import_module(flower_compat._NODE_LOOP)
    monkeypatch.setattr(mod, "time", mod.time)  # both restored after the test
    monkeypatch.setattr(mod, "pull_objects", mod.pull_objects)
    original = mod.pull_objects
    flower_compat._patch_node_loop(0.25)
    assert isinstance(mod.time, flower_compat._CappedSleep) and mod.time.cap == 0.25
    assert isinstance(mod.pull_objects, functools.partial) and mod.pull_objects.func is original
    assert mod.pull_objects.keywords == {"initial_backoff": flower_compat.OBJECT_BACKOFF,
                                         "backoff_cap": flower_compat.OBJECT_BACKOFF_CAP}


def test_node_poll_check_fails_when_the_object_pull_lost_its_backoff(monkeypatch):
    import importlib

    mod = importlib.import_module(flower_compat._NODE_LOOP)
    monkeypatch.setattr(mod, "pull_objects", lambda object_ids, pull_object_fn: {})
    assert "pull_objects no longer takes initial_backoff" in flower_compat.check_node_poll()
