"""fedmed export: ONNX Runtime and TorchScript give PyTorch's calibrated probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedmed.checkpoint import load_checkpoint
from fedmed.export import export_model, input_names
from fedmed.predict import dataset_for, probabilities, read_input

T = 1.7  # a fitted temperature, so the tests see it applied inside the graph


def trained_checkpoint(root: Path, out: Path, *, variant: str = "fusion", temperature: float | None = T) -> Path:
    """A small model trained two epochs on hospital_a of the synthetic cohort (+ a temperature)."""
    from fedmed.config import FedmedConfig
    from fedmed.experiments.local import train_local

    data = yaml.safe_load((root / "fedmed-data.yaml").read_text())["data"]
    data.update(root=str(root), image_size=32, sites=["hospital_a", "hospital_b", "hospital_c"])
    cfg = FedmedConfig.model_validate({
        "name": "synth-export", "output_dir": str(out), "data": data,
        "model": {"variant": variant, "embed_dim": 32, "record_layers": 1, "heads": 2, "fusion_heads": 2},
        "train": {"batch_size": 16, "lr": 0.002, "epochs": 2, "patience": 0, "progress": False,
                  "device": "cpu"},
    })
    res = train_local(cfg, sites=["hospital_a"], out_dir=out / variant)
    path = res["out_dir"] / "model.pt"
    if temperature is not None:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({**raw, "temperature": temperature, "round": 2}, path)
    return path


@pytest.fixture(scope="module")
def fusion_ckpt(tmp_path_factory, synth_root, cache_dir) -> Path:
    return trained_checkpoint(synth_root, tmp_path_factory.mktemp("export"))


def _batches(ckpt, site_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """All of a site's samples as model inputs: as they are, and with every image removed."""
    ds, _ = dataset_for(ckpt, read_input(site_dir, ckpt.config.data))
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with_images = {k: batch[k] for k in input_names(ckpt)}
    without = dict(with_images, image=torch.zeros_like(with_images["image"]),
                   has_image=torch.zeros_like(with_images["has_image"]))
    return with_images, without


def _torch_probs(ckpt, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        z = ckpt.build_model()(**inputs).double().numpy()
    return probabilities(z, temperature=ckpt.calibrated_temperature)


def test_onnx_runtime_matches_pytorch_with_and_without_images(fusion_ckpt, synth_root, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed (pip install 'fedmed[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install 'fedmed[export]')")
    ckpt = load_checkpoint(fusion_ckpt)
    model_path, meta_path = export_model(ckpt, tmp_path / "model.onnx", fmt="onnx")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == input_names(ckpt)
    seen = []
    for inputs in _batches(ckpt, synth_root / "hospital_b"):
        want = _torch_probs(ckpt, inputs)
        logits, got = session.run(["logits", "probabilities"], {k: v.numpy() for k, v in inputs.items()})
        assert got.shape == want.shape and len(got) > 50
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # the temperature is applied in the graph: plain softmax of its logits differs
        plain = probabilities(logits, temperature=1.0)
        assert np.abs(plain - got).max() > 1e-3
        seen.append(got)
    assert np.abs(seen[0] - seen[1]).max() > 1e-3, "removing the images must change the predictions"

    meta = json.loads(meta_path.read_text())
    assert meta["classes"] == ["negative", "positive"] and meta["temperature"] == pytest.approx(T)
    assert meta["image"]["size"] == 32 and meta["image"]["channels"] == 1
    branch = ckpt.build_model().image_branch
    assert meta["image"]["mean"] == pytest.approx(branch.mean.flatten().tolist())
    assert meta["image"]["std"] == pytest.approx(branch.std.flatten().tolist())
    assert meta["records"]["numeric"] == ckpt.config.data.numeric
    assert meta["records"]["encoder"]["mean"] == pytest.approx(ckpt.encoder["mean"])
    assert [i["name"] for i in meta["inputs"]] == input_names(ckpt)


def test_torchscript_matches_pytorch(fusion_ckpt, synth_root, tmp_path):
    ckpt = load_checkpoint(fusion_ckpt)
    model_path, meta_path = export_model(ckpt, tmp_path / "model.ts", fmt="torchscript")
    loaded = torch.jit.load(str(model_path))
    for inputs in _batches(ckpt, synth_root / "hospital_c"):
        _, got = loaded(*inputs.values())
        np.testing.assert_allclose(got.double().numpy(), _torch_probs(ckpt, inputs), atol=1e-5, rtol=0)
    assert json.loads(meta_path.read_text())["format"] == "torchscript"


def test_cli_export_and_refusals(fusion_ckpt, tmp_path, capsys):
    from fedmed.cli import main

    out = tmp_path / "m.ts"
    assert main(["export", str(fusion_ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "m.ts.json").is_file()
    assert main(["export", str(tmp_path / "absent.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
