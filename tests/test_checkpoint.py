"""fedmed.checkpoint: one format for local and federated models, read with weights_only=True."""

from __future__ import annotations

import pickle

import pytest
import torch

from fedmed.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedmed.config import load_config
from fedmed.task import model_from_config


def test_round_trip_and_refusals(synth_config, tmp_path):
    _, path = synth_config()
    cfg = load_config(path)
    model = model_from_config(cfg)
    enc = {"numeric": cfg.data.numeric, "categorical": cfg.data.categorical, "imputation": "median",
           "mean": [1.0] * 6, "std": [2.0] * 6, "median": [0.5] * 6, "fitted": True}
    out = save_checkpoint(tmp_path / "m.pt", weights=model.state_dict(), config=cfg, encoder=enc,
                          temperature=1.3, meta={"round": 4, "score": 0.7})
    ckpt = load_checkpoint(out)
    assert ckpt.temperature == 1.3 and ckpt.meta == {"round": 4, "score": 0.7} and ckpt.classes == cfg.data.classes
    assert ckpt.record_encoder().std == [2.0] * 6
    rebuilt = ckpt.build_model()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="reserved keys"):
        save_checkpoint(tmp_path / "x.pt", weights={}, config=cfg, meta={"temperature": 2})
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": {}, "x": print}))
    with pytest.raises(CheckpointError, match="not a readable fedmed checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"model": {"nope": torch.zeros(1)}, "config": cfg.model_dump(mode="json")}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_checkpoint(tmp_path / "bad.pt").build_model()
