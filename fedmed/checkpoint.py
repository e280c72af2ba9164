"""The one reader of fedmed model files: weights, config, record encoder, meta, temperature.

Two writers exist today and both produce a ``torch.save`` dict with a ``"model"`` state
dict: ``fedmed train-local`` (``model.pt``: ``config`` + ``encoder``) and a federation
(``best_model.pt`` / ``last_model.pt``: ``config``, ``round``, ``score`` and, once
calibrated, ``temperature``). :func:`load_checkpoint` reads either with
``weights_only=True`` (no pickled code runs) into one :class:`Checkpoint`, so evaluation,
prediction, export, explanation and calibration need not re-parse the file.

A federated model has no ``encoder``: each site z-scores its records with statistics of its
own training patients, so the "model's own preprocessing" of records on new data is to fit
the same encoder on that data (:meth:`Checkpoint.record_encoder` returns None to say so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedmed.config import FedmedConfig, load_config
from fedmed.errors import FedmedError

if TYPE_CHECKING:  # the model module imports torch models; checkpoint readers need it only to build one
    from fedmed.models.fusion import FusionModel

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint", "CheckpointError"]

_KNOWN = ("model", "config", "encoder", "temperature")


class CheckpointError(FedmedError, ValueError):
    """A file is not a fedmed checkpoint, or its weights do not fit its config."""


@dataclass(frozen=True)
class Checkpoint:
    """A saved model and everything needed to use it outside fedmed's training code."""

    path: Path
    weights: dict[str, torch.Tensor]
    config: FedmedConfig
    encoder: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.config.data.classes)

    @property
    def calibrated_temperature(self) -> float:
        """The fitted ``T``, or 1.0 (plain softmax) when the model was never calibrated."""
        return float(self.temperature) if self.temperature is not None else 1.0

    def build_model(self) -> FusionModel:
        """The model rebuilt from the config with these weights, eval mode, on the CPU.

        Raises :class:`CheckpointError` when the weights do not fit the config's model.
        """
        from fedmed.task import model_from_config

        model = model_from_config(self.config)
        try:
            model.load_state_dict(self.weights, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not match the config's model ({exc})") from None
        return model.eval()

    def record_encoder(self) -> Any:
        """The fitted :class:`~fedmed.data.records.RecordEncoder` saved with the model, or None
        (federated models: fit one on the data to be scored, as every site did in training)."""
        if self.encoder is None or self.config.model.notes.enabled:
            return None
        from fedmed.data.records import RecordEncoder

        d = self.config.data
        enc = RecordEncoder(numeric=d.numeric, categorical=d.categorical, imputation=d.imputation)
        enc.load_state_dict(self.encoder)
        return enc


def load_checkpoint(path: str | Path, *, config_path: str | Path | None = None) -> Checkpoint:
    """Read a local or federated fedmed checkpoint (``weights_only=True``).

    ``config_path`` replaces the config saved inside (e.g. the data moved). Raises
    ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for a file that is
    not a fedmed checkpoint or carries no config when none is given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors have many types; name the file
        raise CheckpointError(f"{path} is not a readable fedmed checkpoint ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path} is not a fedmed checkpoint (no 'model' state dict)")
    if config_path is not None:
        cfg = load_config(config_path)
    elif isinstance(raw.get("config"), dict):
        cfg = FedmedConfig.model_validate(raw["config"])
    else:
        raise CheckpointError(f"{path} carries no config: pass the YAML it was trained with (--config)")
    temperature = raw.get("temperature")
    weights = {k: torch.as_tensor(v) for k, v in raw["model"].items()}
    return Checkpoint(
        path=path, weights=weights, config=cfg,
        encoder=raw.get("encoder") if isinstance(raw.get("encoder"), dict) else None,
        meta={k: v for k, v in raw.items() if k not in _KNOWN},
        temperature=float(temperature) if isinstance(temperature, (int, float)) else None,
    )


def save_checkpoint(
    path: str | Path,
    *,
    weights: dict[str, Any],
    config: FedmedConfig,
    encoder: dict[str, Any] | None = None,
    temperature: float | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the format :func:`load_checkpoint` reads, atomically (a crash keeps the old file).

    ``meta`` holds plain numbers/strings (``round``, ``score``, ...); it may not reuse the
    reserved keys ``model``, ``config``, ``encoder`` or ``temperature``.
    """
    clash = sorted(set(meta or {}) & set(_KNOWN))
    if clash:
        raise ValueError(f"checkpoint meta may not use the reserved keys {clash}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {"model": {k: torch.as_tensor(v).detach().cpu() for k, v in weights.items()},
                            "config": config.model_dump(mode="json"), **(meta or {})}
    if encoder is not None:
        blob["encoder"] = encoder
    if temperature is not None:
        blob["temperature"] = float(temperature)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path
