"""fedmed-client's supervisor: how often it asks the coordinator's health, and when it leaves.

Every probe passes the coordinator's gateway and SuperLink; in a demo they share the CPU
with the sites' training, so the supervisor probes only as often as leaving within
``--grace`` needs (a probe every second cost the demo ~1 CPU-s per round).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedmed.client import cli


class _Clock:
    """time.monotonic/sleep for the supervisor: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class _Alive:
    """A node process that keeps running."""

    def poll(self) -> None:
        return None


def _run(monkeypatch, tmp_path: Path, *, grace: float, up_until: float, horizon: float = 300.0):
    clock, probes = _Clock(), []

    def problem(address, *, tls=None):
        probes.append(clock.now)
        if clock.now > horizon:
            raise AssertionError("the supervisor did not leave")
        return None if clock.now < up_until else "connection refused"

    monkeypatch.setattr(cli, "time", clock)
    monkeypatch.setattr(cli, "server_problem", problem)
    monkeypatch.setattr(cli, "stop", lambda proc: None)  # nothing real to stop
    log = tmp_path / "supernode.log"
    log.write_text("INFO : SuperNode ID: 7\n")  # the coordinator accepted this node
    args = argparse.Namespace(once=True, grace=grace, server="127.0.0.1:1")
    code = cli._supervise(lambda: [_Alive()], args, None, log)
    return code, probes, clock.now


# the supervisor looks once a second: a probe due every 2.5 s comes every 3 s
@pytest.mark.parametrize(("grace", "every"), [(20.0, 5.0), (5.0, 3.0), (2.0, 1.0)])
def test_the_supervisor_probes_as_often_as_its_grace_needs(monkeypatch, tmp_path, grace, every):
    code, probes, left = _run(monkeypatch, tmp_path, grace=grace, up_until=100.0)
    assert code == 0  # it took part, then the coordinator went away: a clean exit
    gaps = {round(b - a, 1) for a, b in zip(probes, probes[1:], strict=False)}
    assert gaps == {every}  # no probe between: one probe serves "cannot reach" and --once alike
    assert 100.0 + grace < left <= 100.0 + grace + 2 * every + 1  # left within the grace and a probe


def test_a_coordinator_that_never_answered_does_not_make_the_site_leave(monkeypatch, tmp_path):
    # never seen healthy: --once waits for it (a site started before its coordinator)
    with pytest.raises(AssertionError, match="did not leave"):
        _run(monkeypatch, tmp_path, grace=2.0, up_until=0.0, horizon=60.0)
