"""Per-round checkpoints of the global model and the strategy's state, for ``--resume``.

Flower's ``Strategy.start`` cannot resume (its round counter restarts at 1), so fedmed's
round driver saves everything a later round depends on: the global arrays, the strategy
object (FedOpt moments, FedAvgM momentum), the history and the best model so far, and
after the last round the calibration result, so the report can be rebuilt from it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.errors import UsageError

__all__ = ["FederationState", "save_state", "load_state", "save_model", "final_model", "final_arrays"]

STATE_FILE = "state.pkl"


@dataclass
class FederationState:
    """Everything the next round needs; pickled whole after every round."""

    round: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_round: int = 0
    best_score: float = float("-inf")
    config_hash: str = ""
    rng_state: Any = None
    # Temperature scaling after the last round (fedmed.server.calibration); None until then.
    # A class-level default, so states pickled before this field existed load with None.
    calibration: dict[str, Any] | None = None
    # federation.early_stopping_rounds: {"round", "best_round", "patience", "metric"} once it fired.
    stopped_early: dict[str, Any] | None = None
    # federation.personalize: global vs personalised metrics per site (fedmed.server.personalize).
    personalization: dict[str, Any] | None = None
    # federation.cross_site: the model x site matrix of test metrics (fedmed.server.crosssite).
    cross_site: dict[str, Any] | None = None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_state(out_dir: Path, state: FederationState) -> Path:
    """Write ``state.pkl`` atomically (a crash mid-write keeps the previous round)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / STATE_FILE
    _atomic_write(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def load_state(out_dir: Path) -> FederationState:
    """Load the last saved round; a clear error when there is nothing to resume."""
    path = out_dir / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    with open(path, "rb") as fh:
        state = pickle.load(fh)
    if not isinstance(state, FederationState):
        raise UsageError(f"{path} is not a fedmed federation checkpoint")
    return state


def save_model(path: Path, arrays: dict[str, np.ndarray], *, meta: dict[str, Any]) -> Path:
    """A model file loadable without Flower: ``torch.load(path)["model"]`` is a state dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": {k: torch.as_tensor(v) for k, v in arrays.items()}, **meta}, tmp)
    os.replace(tmp, path)
    return path


def final_model(out_dir: Path) -> Path | None:
    """The federation's result: ``best_model.pt`` (the round picked on validation), else
    ``last_model.pt`` (no round was judged); None before the first round closed."""
    return next((p for p in (out_dir / "best_model.pt", out_dir / "last_model.pt") if p.exists()), None)


def final_arrays(out_dir: Path, state: FederationState) -> dict[str, np.ndarray]:
    """The weights of :func:`final_model`, else the state's current global arrays."""
    path = final_model(out_dir)
    if path is None:
        return state.arrays
    return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True)["model"].items()}
