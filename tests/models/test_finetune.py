"""Fine-tuning options for pretrained backbones: frozen stages, local BatchNorm keys, DP with a
frozen backbone, the backbone's learning rate, warm-up and the memory format."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.validators import ModuleValidator
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fedmed.config import FedmedConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedmed.models import build_model, local_keys
from fedmed.models.backbones import backbone_stages
from fedmed.train.loop import make_optimizer, memory_format
from fedmed.train.schedule import lr_factor, warmup_rounds

FROZEN = (FrozenBatchNorm2d, FrozenBatchNormAct2d)


def _image_model(backbone: str = "test_efficientnet", *, in_chans: int = 3, **model: object) -> nn.Module:
    cfg = ModelConfig(variant="image", backbone=backbone, embed_dim=16, heads=2, fusion_heads=2,
                      dp_compatible=False, **model)
    return build_model(cfg, n_classes=3, in_chans=in_chans, n_numeric=0, cat_cardinalities=[])


def _trainable_backbone(model: nn.Module) -> set[str]:
    return {n for n, p in model.image_branch.backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "backbone,stages,frozen_stages",
    [("test_efficientnet", None, 0), ("test_efficientnet", 0, 6), ("test_efficientnet", 2, 4),
     ("test_efficientnet", 64, 0), ("small_cnn", 1, 2), ("test_resnet", 0, 5)],
)
def test_trainable_stages_freeze_the_first_stages_and_their_batchnorm(backbone, stages, frozen_stages):
    model = _image_model(backbone, trainable_stages=stages)
    all_stages = backbone_stages(model.image_branch.backbone)
    trainable = _trainable_backbone(model)
    for i, names in enumerate(all_stages):
        in_stage = {n for n in trainable if any(n.startswith(m + ".") for m in names)}
        if i < frozen_stages:
            assert not in_stage, f"stage {i} should be frozen"
        elif any(p.numel() for m in names for p in model.image_branch.backbone.get_submodule(m).parameters()):
            assert in_stage, f"stage {i} should train"
    head = [p for n, p in model.named_parameters() if not n.startswith("image_branch.backbone.")]
    assert all(p.requires_grad for p in head)  # the new head always trains
    if stages == 0:
        assert not trainable
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    frozen_bns = [m for m in model.modules() if isinstance(m, FROZEN)]
    assert (len(frozen_bns) > 0) == (frozen_stages > 0 and backbone != "small_cnn")
    if stages == 0:
        assert not bns  # nothing left that would update statistics or need GroupNorm


def test_frozen_batchnorm_statistics_stay_fixed_in_training():
    model = _image_model(trainable_stages=1)
    before = copy.deepcopy(model.state_dict())
    model.train()
    model(image=torch.rand(4, 3, 32, 32) * 3)
    after = model.state_dict()
    frozen = [n for n, m in model.named_modules() if isinstance(m, FROZEN)]
    live = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert frozen and live
    for n in frozen:
        torch.testing.assert_close(after[f"{n}.running_mean"], before[f"{n}.running_mean"], rtol=0, atol=0)
    assert any(not torch.equal(after[f"{n}.running_mean"], before[f"{n}.running_mean"]) for n in live)


@pytest.mark.parametrize(
    "model_kw,mode,expected",
    [({}, "average", 0),
     ({}, "local", None),                          # every BatchNorm tensor of the backbone
     ({"trainable_stages": 0}, "local", 0),        # frozen statistics are shared, not local
     ({"dp_compatible": True}, "local", 0)],       # GroupNorm: nothing to keep
)
def test_local_keys_are_the_trainable_batchnorm_tensors(model_kw, mode, expected):
    kw = {"dp_compatible": False, **model_kw}
    cfg = ModelConfig(variant="image", backbone="test_efficientnet", embed_dim=16, heads=2, fusion_heads=2, **kw)
    model = build_model(cfg, n_classes=3, in_chans=3, n_numeric=0, cat_cardinalities=[])
    keys = local_keys(model, mode)
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if expected is None:
        assert len(keys) == 5 * len(bn) > 0
        assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias", "running_mean", "running_var",
                                                      "num_batches_tracked"}
        assert set(keys) <= set(model.state_dict())
    else:
        assert len(keys) == expected
    with pytest.raises(ValueError, match="average, local"):
        local_keys(model, "mean")


@pytest.mark.parametrize("variant", ["fusion", "image"])
def test_dp_accepts_a_frozen_pretrained_batchnorm_backbone(tmp_path, variant):
    """DP-SGD on the unfrozen part only: Opacus accepts the model, BatchNorm stays BatchNorm
    (frozen), and one private step moves the head while the backbone stays bit-identical."""
    from benchmarks.dp_step import _Samples
    from fedmed.privacy import PrivacyLedger, make_private, plan_dp
    from fedmed.train.loop import train_epochs

    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, backbone="test_efficientnet", embed_dim=16, heads=2, fusion_heads=2,
                      dp_compatible=False, trainable_stages=0)
    model = build_model(cfg, n_classes=2, in_chans=1, n_numeric=6, cat_cardinalities=[2])
    assert ModuleValidator.validate(model, strict=False) == []
    assert any(isinstance(m, FROZEN) for m in model.modules())
    before = copy.deepcopy(model.state_dict())
    data = _Samples(16, 32)
    plan = plan_dp(privacy=PrivacyConfig(enabled=True), n_train=len(data), batch_size=8, rounds=1, local_epochs=1)
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    dp_model, dp_opt, loader, engine = make_private(model, opt, data, plan=plan,
                                                    ledger=PrivacyLedger(tmp_path / "l.json", accountant="rdp"),
                                                    generator=torch.Generator().manual_seed(0))
    stats = train_epochs(dp_model, loader, loss_fn=nn.CrossEntropyLoss(), optimizer=dp_opt,
                         device=torch.device("cpu"), amp=False)
    assert stats["steps"] >= 1 and engine.accountant.history
    after = dp_model._module.state_dict()
    for k, v in before.items():
        if k.startswith("image_branch.backbone."):
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_dp_refuses_trainable_batchnorm_with_a_clear_reason():
    from fedmed.privacy import make_private

    model = _image_model(trainable_stages=1)
    with pytest.raises(ValueError, match="BatchNorm"):
        make_private(model, make_optimizer(model, TrainConfig()), None, plan=None, ledger=None)


@pytest.mark.parametrize("scale,groups", [(1.0, [1e-3]), (0.1, [1e-3, 1e-4]), (0.5, [1e-3, 5e-4])])
def test_backbone_learning_rate_is_its_own_group(scale, groups):
    model = _image_model()
    opt = make_optimizer(model, TrainConfig(lr=1e-3, backbone_lr_scale=scale))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(groups)
    n_backbone = sum(1 for p in model.image_branch.backbone.parameters() if p.requires_grad)
    if scale != 1.0:
        assert len(opt.param_groups[1]["params"]) == n_backbone
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_no_warmup_is_the_old_cosine_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for e in range(7):
        assert lr_factor(e, total=7) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        old.step()


@pytest.mark.parametrize(
    "step,total,warmup,cosine,expected",
    [(0, 10, 2, True, 1 / 3), (1, 10, 2, True, 2 / 3), (2, 10, 2, True, 1.0),
     (6, 10, 2, True, 0.5 * (1 + math.cos(math.pi * 4 / 8))), (0, 5, 1, False, 0.5), (3, 5, 1, False, 1.0)],
)
def test_warmup_then_cosine(step, total, warmup, cosine, expected):
    assert lr_factor(step, total=total, warmup=warmup, cosine=cosine) == pytest.approx(expected)


def test_fit_and_federation_warm_up(synth_config):
    from fedmed.server.federation import round_lr

    assert [warmup_rounds(w, e) for w, e in ((0, 1), (2, 1), (3, 2), (1, 5))] == [0, 2, 2, 1]
    raw, _ = synth_config(train={"lr": 0.01, "warmup_epochs": 2}, federation={"rounds": 6, "local_epochs": 1})
    cfg = FedmedConfig.model_validate(raw)
    lrs = [round_lr(cfg, r) for r in range(1, 7)]
    assert lrs[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01]) and lrs[3] < lrs[2] and lrs[-1] > 0


@pytest.mark.parametrize("device,flag,fmt", [("cpu", True, torch.channels_last),
                                             ("cpu", False, torch.contiguous_format),
                                             ("cuda", True, torch.channels_last),
                                             ("cuda", False, torch.contiguous_format),
                                             ("mps", True, torch.contiguous_format)])
def test_channels_last_on_cuda_and_cpu(device, flag, fmt):
    assert memory_format(torch.device(device), flag) is fmt


def test_cpu_step_in_channels_last_ships_the_same_weights():
    """NHWC parameters must reach the wire in their logical order: pack → unpack gives the
    state dict's values, and a fresh NCHW model loads them unchanged."""
    from torch.utils.data import DataLoader

    from benchmarks.dp_step import _Samples
    from fedmed.train.loop import train_epochs
    from fedmed.transfer import pack, unpack

    model = _image_model(in_chans=1)
    loader = DataLoader(_Samples(16, 32), batch_size=8)
    stats = train_epochs(model, loader, loss_fn=nn.CrossEntropyLoss(), optimizer=make_optimizer(model, TrainConfig()),
                         device=torch.device("cpu"), channels_last=True)
    assert stats["steps"] == 2 and math.isfinite(stats["loss"])
    conv = next(m.weight for m in model.modules()
                if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1))
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fresh = _image_model(in_chans=1)
    back = unpack(pack(model.state_dict()), fresh.state_dict())
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_step_with_amp_and_channels_last():
    from torch.utils.data import DataLoader

    from benchmarks.dp_step import _Samples
    from fedmed.train.loop import train_epochs

    model = _image_model(in_chans=1).cuda()
    loader = DataLoader(_Samples(16, 32), batch_size=8)
    stats = train_epochs(model, loader, loss_fn=nn.CrossEntropyLoss(), optimizer=make_optimizer(model, TrainConfig()),
                         device=torch.device("cuda"), amp=True, channels_last=True)
    assert stats["steps"] == 2 and math.isfinite(stats["loss"])
    assert model.image_branch.backbone.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_progress_bar_per_epoch_shows_images_per_second(capsys):
    from torch.utils.data import DataLoader

    from benchmarks.dp_step import _Samples
    from fedmed.train.loop import train_epochs

    model = _image_model(in_chans=1)
    loader = DataLoader(_Samples(16, 32), batch_size=8)
    stats = train_epochs(model, loader, loss_fn=nn.CrossEntropyLoss(), optimizer=make_optimizer(model, TrainConfig()),
                         device=torch.device("cpu"), epochs=2, progress=True, desc="site")
    err = capsys.readouterr().err
    assert "site 1/2" in err and "site 2/2" in err and "img_s=" in err
    assert stats["images_per_s"] == pytest.approx(stats["samples"] / stats["seconds"]) and stats["samples"] == 32
