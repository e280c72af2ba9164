"""Which model a federated row of `fedmed compare` scores: the round picked on validation."""

from __future__ import annotations

from pathlib import Path

from fedmed.experiments.compare import federated_checkpoint
from fedmed.server.checkpoint import FederationState


def _state(best_round: int) -> FederationState:
    history = [{"round": r, "per_site": {"a": {"accuracy": r / 10}}} for r in (1, 2, 3)]
    return FederationState(round=3, history=history, best_round=best_round)


def test_the_round_picked_on_validation_not_the_last(tmp_path: Path) -> None:
    for name in ("best_model.pt", "last_model.pt"):
        (tmp_path / name).write_bytes(b"")
    path, row = federated_checkpoint(_state(best_round=2), tmp_path)
    assert path == tmp_path / "best_model.pt"
    assert row is not None and row["round"] == 2  # the sites' own scores of that same round


def test_the_last_round_when_no_round_was_judged(tmp_path: Path) -> None:
    (tmp_path / "last_model.pt").write_bytes(b"")
    path, row = federated_checkpoint(_state(best_round=0), tmp_path)
    assert path == tmp_path / "last_model.pt" and row is not None and row["round"] == 3
    path, row = federated_checkpoint(FederationState(), tmp_path)
    assert path == tmp_path / "last_model.pt" and row is None
