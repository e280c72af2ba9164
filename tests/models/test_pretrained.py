"""Loading real weights files: by name, by order (another library's layout), or refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedmed.config import load_config
from fedmed.models import create_backbone
from fedmed.models.pretrained import WeightsMismatch, load_pretrained
from fedmed.task import model_from_config

REPO = Path(__file__).resolve().parents[2]
LITE0 = (REPO / ".." / "shared" / "weights" / "efficientnet-lite0-57934424.pth").resolve()
needs_lite0 = pytest.mark.skipif(
    not LITE0.is_file(),
    reason=f"real EfficientNet-Lite0 weights not found at {LITE0} (../shared is absent in a fresh clone)")


def _file_order(path: Path) -> list[torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return [v for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def _config_file(tmp_path: Path, **model: object) -> Path:
    cfg = {"data": {"classes": ["a", "b", "c"], "channels": 3, "image_size": 64},
           "model": {"variant": "image", "backbone": "efficientnet_lite0", "dp_compatible": False, **model}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@needs_lite0
def test_shared_lite0_file_loads_as_efficientnet_lite0_from_config_alone(tmp_path, caplog):
    """EfficientNet-PyTorch names, timm model: every backbone tensor comes from the file, in order."""
    import os

    rel = os.path.relpath(LITE0, tmp_path)  # relative paths resolve against the YAML's folder
    cfg = load_config(_config_file(tmp_path, pretrained_path=rel))
    with caplog.at_level("INFO", logger="fedmed.models.pretrained"):
        model = model_from_config(cfg)
    backbone = model.image_branch.backbone
    rep = backbone.pretrained_report
    assert rep.mode == "order" and rep.loaded == 245 and not rep.adapted
    assert [k for k, _ in rep.skipped] == ["_fc.weight", "_fc.bias"]
    assert all("classifier head" in why for _, why in rep.skipped)
    assert "loaded 245 tensors" in caplog.text and "_fc.weight" in caplog.text
    mine = [v for k, v in backbone.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    for a, b in zip(mine, _file_order(LITE0)[:245], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the backbone's own input statistics (ImageNet) are used when model.image_mean/std are unset
    torch.testing.assert_close(model.image_branch.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    # and it classifies a real-looking image into ImageNet features (BN statistics are live)
    backbone.eval()
    f = backbone(torch.rand(2, 3, 64, 64))
    assert f.shape == (2, 1280, 2, 2) and torch.isfinite(f).all()


@needs_lite0
def test_shared_lite0_into_one_channel_adapts_the_stem():
    net = create_backbone("efficientnet_lite0", in_chans=1, pretrained_path=str(LITE0), dp_compatible=False)
    assert net.pretrained_report.adapted == ["conv_stem.weight"]
    stem = _file_order(LITE0)[0]
    torch.testing.assert_close(net.model.conv_stem.weight, stem.sum(dim=1, keepdim=True))


@needs_lite0
def test_shared_lite0_refused_by_another_architecture():
    with pytest.raises(WeightsMismatch, match=r"_conv_stem\.weight.*\[32, 3, 3, 3\].*conv1\.weight"):
        create_backbone("resnet18", in_chans=3, pretrained_path=str(LITE0), dp_compatible=False)


@pytest.mark.parametrize(
    "make_file,backbone,match",
    [
        # a resnet18 state dict for an EfficientNet: the first tensor already differs
        (lambda: create_backbone("resnet18", in_chans=3, dp_compatible=False).model.state_dict(),
         "efficientnet_lite0", r"'conv1\.weight' \[64, 3, 7, 7\] does not fit the backbone's 'conv_stem\.weight'"),
        # names match but one shape does not (a resnet34 block count / width would differ here)
        (lambda: {**create_backbone("resnet18", in_chans=3, dp_compatible=False).model.state_dict(),
                  "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
         "resnet18", r"'layer1\.0\.conv1\.weight' \[64, 64, 1, 1\] does not fit"),
        # the right architecture's first 10 entries only (9 tensors: num_batches_tracked is not counted)
        (lambda: {f"t{i}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(
            create_backbone("resnet18", in_chans=3, dp_compatible=False).model.state_dict().items()) if i < 10},
         "resnet18", r"only 9 tensors for the backbone's 100 .* 'layer1\.0\.bn1\.running_var'"),
    ],
    ids=["resnet18-file-into-lite0", "names-match-shape-differs", "too-few-tensors"],
)
def test_files_for_another_architecture_are_refused_naming_the_tensor(tmp_path, make_file, backbone, match):
    path = tmp_path / "other.pth"
    torch.save(make_file(), path)
    with pytest.raises(WeightsMismatch, match=match):
        create_backbone(backbone, in_chans=3, pretrained_path=str(path), dp_compatible=False)


def test_names_under_a_checkpoint_prefix_load(tmp_path):
    """A fedmed model.pt (``{"model": full model state}``) feeds the same backbone by name."""
    cfg = load_config(_config_file(tmp_path, backbone="resnet18"))
    src = model_from_config(cfg)
    path = tmp_path / "model.pt"
    torch.save({"model": src.state_dict(), "config": {"x": 1}}, path)
    net = create_backbone("resnet18", in_chans=3, pretrained_path=str(path), dp_compatible=False)
    rep = net.pretrained_report
    assert rep.mode == "names" and rep.loaded == 100
    assert {k.split(".")[0] for k, _ in rep.skipped} == {"head", "classifier", "image_branch"}
    torch.testing.assert_close(net.model.layer4[1].bn2.running_var,
                               src.image_branch.backbone.model.layer4[1].bn2.running_var, rtol=0, atol=0)


def test_order_mode_checks_tensor_kinds(tmp_path):
    """Same shapes in order but a running mean where the model has a norm weight: refused."""
    model = create_backbone("small_cnn", in_chans=1, width=8)
    sd = {f"x{i}.{'running_mean' if i == 2 else k.rsplit('.', 1)[-1]}": v
          for i, (k, v) in enumerate(model.state_dict().items())}
    path = tmp_path / "kinds.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatch, match=r"'x2\.running_mean'.*'blocks\.0\.1\.weight'.*tensor #3 in order"):
        load_pretrained(create_backbone("small_cnn", in_chans=1, width=8), path, in_chans=1)
