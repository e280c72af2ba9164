from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedmed.models import create_backbone, list_backbones
from fedmed.models.backbones import DEFAULT_CFGS, SmallCNN
from fedmed.models.pretrained import WeightsMismatch, read_state_dict


def _has_inplace(m: nn.Module) -> bool:
    return any(getattr(x, "inplace", False) is True for x in m.modules())


def _has_bn(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_registry_lists_small_cnn_with_defaults():
    assert "small_cnn" in list_backbones()
    assert set(list_backbones()) <= set(DEFAULT_CFGS)


@pytest.mark.parametrize("in_chans,width,size", [(1, 32, 64), (3, 8, 32)])
def test_small_cnn_feature_map(in_chans, width, size):
    net = create_backbone("small_cnn", in_chans=in_chans, width=width)
    assert isinstance(net, SmallCNN) and net.output == "map"
    f = net(torch.rand(2, in_chans, size, size))
    assert f.shape == (2, net.num_features, size // 8, size // 8) and net.num_features == 4 * width


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_dp_compatible_backbones_pass_opacus(name):
    net = create_backbone(name, in_chans=1, dp_compatible=True)
    assert ModuleValidator.validate(net, strict=False) == []
    assert not _has_bn(net) and not _has_inplace(net)
    f = net(torch.rand(2, 1, 64, 64))
    assert f.ndim == 4 and f.shape[:2] == (2, net.num_features)


def test_dp_incompatible_keeps_batchnorm():
    net = create_backbone("resnet18", in_chans=3, dp_compatible=False)
    assert _has_bn(net)
    assert ModuleValidator.validate(net, strict=False) != []


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError) as err:
        create_backbone("no_such_net_xyz", in_chans=1)
    msg = str(err.value)
    assert "small_cnn" in msg and "timm" in msg


@pytest.fixture(scope="module")
def resnet_source():
    """A BN resnet18 with non-trivial BN affine params (so the GN carry-over is visible)."""
    src = create_backbone("resnet18", in_chans=3, dp_compatible=False).model
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return src


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_round_trip(tmp_path, resnet_source, suffix):
    sd = {k: v.contiguous() for k, v in resnet_source.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    assert set(read_state_dict(path)) == set(sd)
    net = create_backbone("resnet18", in_chans=3, pretrained_path=str(path), dp_compatible=True)
    loaded = net.model.state_dict()
    compared = 0
    for k, v in loaded.items():
        if k in sd and sd[k].shape == v.shape:
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
            compared += 1
    assert compared == sum(1 for p in net.parameters())  # every parameter came from the file
    assert not _has_bn(net)


def test_local_weights_adapt_input_conv(tmp_path, resnet_source):
    path = tmp_path / "rgb.pt"
    torch.save(resnet_source.state_dict(), path)
    net = create_backbone("resnet18", in_chans=1, pretrained_path=str(path))
    expected = resnet_source.conv1.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(net.model.conv1.weight, expected)


def test_weights_file_that_matches_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsMismatch,
                       match=r"'foo\.weight' \[3\] does not fit the backbone's 'blocks\.0\.0\.weight'"):
        create_backbone("small_cnn", in_chans=1, pretrained_path=str(path))
    with pytest.raises(FileNotFoundError):
        create_backbone("small_cnn", in_chans=1, pretrained_path=str(tmp_path / "missing.pt"))


def test_small_cnn_local_weights(tmp_path):
    src = create_backbone("small_cnn", in_chans=1)
    path = tmp_path / "cnn.pth"
    torch.save(src.state_dict(), path)
    net = create_backbone("small_cnn", in_chans=1, pretrained_path=str(path))
    for (k, a), b in zip(src.state_dict().items(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_small_cnn_preprocessing_defaults_are_imagenet_stats():
    """Centred inputs by default (raw [0, 1] pixels kept the random-init CNN from learning)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = create_backbone("small_cnn", in_chans=3).default_cfg
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
