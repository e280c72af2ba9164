"""DP-SGD at the site: cumulative ε over rounds, a ledger that survives restarts, site caps."""

from __future__ import annotations

import pytest
import yaml
from flwr.app import Context, RecordDict

from fedmed.client.app import _private_round
from fedmed.client.site import runtime_for
from fedmed.config import load_config
from fedmed.job import job_for_sites
from fedmed.messages import PublicRefusal
from fedmed.privacy import BudgetError, PrivacyLedger


def _runtime(synth_config, synth_root, tmp_path, *, site_caps: dict, privacy: dict, rounds: int = 3):
    cfg, path = synth_config(privacy={"enabled": True, **privacy},
                             federation={"rounds": rounds, "local_epochs": 1},
                             model={"variant": "record"})
    job = job_for_sites(load_config(path))
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_a", "data_dir": str(synth_root / "hospital_a"),
                                         "state_dir": str(tmp_path / "state"), **site_caps}))
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)},
                  state=RecordDict(), run_config={})
    return runtime_for(job, ctx)


def test_epsilon_accumulates_to_target_and_survives_restart(synth_config, synth_root, tmp_path):
    rt = _runtime(synth_config, synth_root, tmp_path, site_caps={"policy": {"max_epsilon": 8.0}},
                  privacy={"target_epsilon": 4.0, "target_delta": 1e-3})
    eps = [_private_round(rt, lr=1e-3, mu=0.0, rnd=r, federation="f1")[1] for r in (1, 2, 3)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(4.0, rel=0.1)  # the plan spends the target over all rounds
    ledger = PrivacyLedger(tmp_path / "state" / "privacy" / "f1.json", accountant="rdp")
    assert ledger.epsilon(1e-3) == pytest.approx(eps[2])  # a restarted site knows what it spent
    with pytest.raises(BudgetError, match="budget spent"):  # a 4th round would overspend
        _private_round(rt, lr=1e-3, mu=0.0, rnd=4, federation="f1")


def test_site_refuses_plan_above_its_cap(synth_config, synth_root, tmp_path):
    # refused by the site's policy when the job arrives, before its data is read
    with pytest.raises(PublicRefusal, match="policy.max_epsilon"):
        _runtime(synth_config, synth_root, tmp_path, site_caps={"policy": {"max_epsilon": 1.0}},
                 privacy={"target_epsilon": 8.0})


def test_spend_mode_trains_until_its_own_cap(synth_config, synth_root, tmp_path):
    rt = _runtime(synth_config, synth_root, tmp_path, site_caps={"policy": {"max_epsilon": 6.0, "budget": "spend"}},
                  privacy={"target_epsilon": 8.0}, rounds=4)
    spent = []
    with pytest.raises(BudgetError, match="budget spent"):
        for r in range(1, 5):
            spent.append(_private_round(rt, lr=1e-3, mu=0.0, rnd=r, federation="f3")[1])
    assert 1 <= len(spent) < 4 and spent[-1] <= 6.0 * 1.01


def test_a_new_federation_id_is_no_new_budget(synth_config, synth_root, tmp_path):
    """policy.max_total_epsilon caps ε summed over every federation the site trained in."""
    rt = _runtime(synth_config, synth_root, tmp_path, site_caps={"policy": {"max_total_epsilon": 6.0}},
                  privacy={"target_epsilon": 4.0}, rounds=3)
    first = [_private_round(rt, lr=1e-3, mu=0.0, rnd=r, federation="f1")[1] for r in (1, 2, 3)]
    second = []
    with pytest.raises(BudgetError, match="budget"):
        for r in (1, 2, 3):  # the coordinator starts "another" federation to reset the budget
            second.append(_private_round(rt, lr=1e-3, mu=0.0, rnd=r, federation="f2")[1])
    assert len(second) < 3 and first[-1] + (second[-1] if second else 0.0) <= 6.0 * 1.01


# --- per-sample gradients: fedmed's Conv2d grad sampler against Opacus' own and plain autograd ---

import copy  # noqa: E402

import torch  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.grad_sample.conv import compute_conv_grad_sample  # noqa: E402
from torch import nn  # noqa: E402

from fedmed.dp_conv import conv2d_grad_sample, fast_conv2d_enabled, use_fast_conv2d  # noqa: E402


@pytest.mark.parametrize("kernel,padding,bias,hw", [
    (3, 1, True, (32, 32)), (3, 0, False, (34, 40)), (5, 2, True, (32, 36)), (1, 0, True, (32, 32)),
    ((3, 5), (1, 2), True, (33, 32)),
])
def test_fast_conv_grad_sample_matches_opacus(kernel, padding, bias, hw):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 5, kernel, padding=padding, bias=bias)
    x = torch.randn(3, 8, *hw)
    g = torch.randn_like(layer(x))
    ours, ref = conv2d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
    assert ours.keys() == ref.keys()
    for p in ref:
        torch.testing.assert_close(ours[p], ref[p], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, groups=2),
                                   nn.Conv2d(8, 4, 3, dilation=2), nn.Conv2d(8, 4, 3, padding="same"),
                                   nn.Conv2d(2, 4, 3, padding=1)])
def test_fast_conv_grad_sample_falls_back_to_opacus(layer):
    x = torch.randn(2, layer.in_channels, 32, 32)
    g = torch.randn_like(layer(x))
    ours, ref = conv2d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
    for p in ref:
        torch.testing.assert_close(ours[p], ref[p])


def _per_sample_by_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Ground truth: one backward per sample (Opacus' grad_sample is each sample's own gradient)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def test_dp_model_per_sample_grads_are_exact():
    """The CNN Opacus wraps gets the per-sample gradients autograd gives, sample by sample."""
    from fedmed.models.backbones import SmallCNN

    torch.manual_seed(0)
    net = nn.Sequential(SmallCNN(in_chans=1, width=8), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 1, 0])
    net(x)  # materialise the lazy layer
    expected = _per_sample_by_autograd(copy.deepcopy(net), x, y)
    was = fast_conv2d_enabled()
    try:
        use_fast_conv2d(True)
        gsm = GradSampleModule(copy.deepcopy(net), batch_first=True, loss_reduction="mean")
        nn.functional.cross_entropy(gsm(x), y).backward()
        for p, want in zip(gsm.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad_sample, want, rtol=1e-4, atol=1e-5)
    finally:
        use_fast_conv2d(was)


@pytest.mark.parametrize("backbone", ["small_cnn", "test_resnet"])
def test_make_private_trains_the_fusion_model(tmp_path, backbone):
    """One DP step on the full fusion model (fedmed CNN or a timm backbone) updates every weight."""
    from benchmarks.dp_step import _Samples
    from fedmed.config import ModelConfig, PrivacyConfig, TrainConfig
    from fedmed.models import build_model
    from fedmed.privacy import make_private, plan_dp
    from fedmed.train.loop import make_optimizer, train_epochs

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, embed_dim=32), n_classes=2, in_chans=1,
                        n_numeric=6, cat_cardinalities=[2])
    data = _Samples(16, 32)
    before = copy.deepcopy(model.state_dict())
    plan = plan_dp(privacy=PrivacyConfig(enabled=True), n_train=len(data), batch_size=8, rounds=1, local_epochs=1)
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    dp_model, dp_opt, loader, engine = make_private(model, opt, data, plan=plan,
                                                    ledger=PrivacyLedger(tmp_path / "l.json", accountant="rdp"),
                                                    generator=torch.Generator().manual_seed(0))
    assert fast_conv2d_enabled()
    stats = train_epochs(dp_model, loader, loss_fn=nn.CrossEntropyLoss(), optimizer=dp_opt,
                         device=torch.device("cpu"), amp=False)
    assert stats["steps"] >= 1 and engine.accountant.history
    after = dp_model._module.state_dict()
    moved = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert len(moved) == sum(1 for v in before.values() if v.is_floating_point())
