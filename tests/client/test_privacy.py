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
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from fedmed.dp_conv import (  # noqa: E402
    conv2d_grad_sample,
    fast_conv2d_enabled,
    group_norm_grad_sample,
    skip_batch_param_grads,
    skips_batch_param_grads,
    use_fast_conv2d,
)


def _layer_inputs(backbone: str, in_chans: int, types: tuple[type, ...]) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Every distinct (layer, input shape) of ``types`` in a real backbone at 64 px (DP-compatible)."""
    from fedmed.models.backbones import create_backbone

    torch.manual_seed(0)
    net, seen = create_backbone(backbone, in_chans=in_chans, dp_compatible=True), {}

    def hook(mod, inp, _out):
        seen.setdefault((repr(mod), tuple(inp[0].shape[1:])), (mod, tuple(inp[0].shape[1:])))

    handles = [m.register_forward_hook(hook) for m in net.modules() if type(m) in types]
    net(torch.randn(2, in_chans, 64, 64))
    for h in handles:
        h.remove()
    return list(seen.values())


def _assert_grad_samples_close(ours, ref, *, rtol=1e-4):
    """Same keys; each per-sample gradient equal up to float32 rounding of a different summation
    order (tolerance relative to the tensor's largest entry)."""
    assert ours.keys() == ref.keys()
    for p in ref:
        assert ours[p].shape == ref[p].shape and ours[p].dtype == ref[p].dtype
        torch.testing.assert_close(ours[p], ref[p], rtol=rtol, atol=rtol * float(ref[p].abs().max()))


CONV_CASES = [  # (layer, input h×w): every branch of conv2d_grad_sample (grouped call, 1×1 product)
    (nn.Conv2d(8, 5, 3, padding=1), (32, 32)), (nn.Conv2d(8, 5, 3, bias=False), (34, 40)),
    (nn.Conv2d(8, 5, 5, padding=2), (32, 36)), (nn.Conv2d(8, 5, 1), (32, 32)),
    (nn.Conv2d(8, 5, (3, 5), padding=(1, 2)), (33, 32)), (nn.Conv2d(8, 4, 3, stride=2, padding=1), (32, 31)),
    (nn.Conv2d(8, 8, 3, groups=2), (16, 16)), (nn.Conv2d(8, 8, 5, groups=8, padding=2, stride=2), (15, 16)),
    (nn.Conv2d(8, 4, 3, dilation=2), (20, 20)), (nn.Conv2d(3, 4, 3, padding=1), (32, 32)),
    (nn.Conv2d(1, 4, 3, padding=1), (16, 16)), (nn.Conv2d(8, 4, 1, stride=2), (16, 16)),
    (nn.Conv2d(8, 4, 1, padding=1, bias=False), (8, 8)),
]


@pytest.mark.parametrize("layer,hw", CONV_CASES, ids=lambda v: repr(v) if isinstance(v, nn.Module) else None)
def test_fast_conv_grad_sample_matches_opacus(layer, hw):
    torch.manual_seed(0)
    x = torch.randn(3, layer.in_channels, *hw)
    g = torch.randn_like(layer(x))
    _assert_grad_samples_close(conv2d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g))
    # in float64 the two agree to 1e-10: the differences above are rounding, not a formula
    l64 = copy.deepcopy(layer).double()
    _assert_grad_samples_close(conv2d_grad_sample(l64, [x.double()], g.double()),
                               compute_conv_grad_sample(l64, [x.double()], g.double()), rtol=1e-10)


@pytest.mark.parametrize("backbone,in_chans,batch", [("small_cnn", 1, 32), ("efficientnet_lite0", 3, 4)])
def test_fast_grad_samplers_match_opacus_on_every_layer_of_the_models(backbone, in_chans, batch):
    """Each Conv2d / GroupNorm shape of the fusion CNN (at its site batch, 32) and of the
    pretrained EfficientNet-Lite0 (strided, depthwise, 1×1, 5×5; DP-compatible) at 64 px."""
    cases = _layer_inputs(backbone, in_chans, (nn.Conv2d, nn.GroupNorm))
    assert sum(isinstance(m, nn.Conv2d) for m, _ in cases) >= (6 if backbone == "small_cnn" else 30)
    g_gen = torch.Generator().manual_seed(1)
    for layer, shape in cases:
        x = torch.randn(batch, *shape, generator=g_gen)
        with torch.no_grad():
            g = torch.randn(layer(x).shape, generator=g_gen)
        if isinstance(layer, nn.Conv2d):
            ours, ref = conv2d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
        else:
            ours, ref = group_norm_grad_sample(layer, [x], g), compute_group_norm_grad_sample(layer, [x], g)
        _assert_grad_samples_close(ours, ref)


@pytest.mark.parametrize("layer,n", [(nn.Conv2d(8, 4, 3, padding="same"), 2), (nn.Conv2d(8, 4, 3, padding="valid"), 2),
                                     (nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"), 2),
                                     (nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"), 2),
                                     (nn.Conv2d(8, 4, 3, padding=1), 0)])
def test_fast_conv_grad_sample_falls_back_to_opacus(layer, n):
    x = torch.randn(n, layer.in_channels, 12, 12)
    g = torch.randn_like(layer(x))
    ours, ref = conv2d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
    assert ours.keys() == ref.keys()
    for p in ref:
        torch.testing.assert_close(ours[p], ref[p], rtol=0, atol=0)


@pytest.mark.parametrize("layer,shape", [
    (nn.GroupNorm(8, 32), (32, 64, 64)), (nn.GroupNorm(4, 16), (16, 5, 7)), (nn.GroupNorm(2, 6), (6,)),
    (nn.GroupNorm(3, 6), (6, 4, 4, 4)), (nn.GroupNorm(1, 4), (4, 8, 8)),
])
def test_fast_group_norm_grad_sample_matches_opacus(layer, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    x = torch.randn(5, *shape) * 3 + 2  # an offset mean: the normalisation must remove it
    g = torch.randn_like(x)
    _assert_grad_samples_close(group_norm_grad_sample(layer, [x], g), compute_group_norm_grad_sample(layer, [x], g))


def test_fast_group_norm_grad_sample_falls_back_on_empty_batches():
    layer, x = nn.GroupNorm(2, 4), torch.randn(0, 4, 3, 3)
    ours, ref = group_norm_grad_sample(layer, [x], x), compute_group_norm_grad_sample(layer, [x], x)
    assert ours.keys() == ref.keys() and all(ours[p].shape == ref[p].shape == (0, 4) for p in ref)


def _per_sample_by_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Ground truth: one backward per sample (Opacus' grad_sample is each sample's own gradient)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def test_dp_model_per_sample_grads_are_exact():
    """The CNN Opacus wraps gets the per-sample gradients autograd gives, sample by sample, with
    fedmed's samplers and the batch gradients of its convolutions skipped (3-channel input,
    a strided and a 1×1 conv after the CNN)."""
    from fedmed.models.backbones import SmallCNN

    torch.manual_seed(0)
    net = nn.Sequential(SmallCNN(in_chans=3, width=8), nn.Conv2d(32, 8, 3, stride=2, padding=1), nn.Conv2d(8, 4, 1),
                        nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    net(x)  # materialise the lazy layer
    expected = _per_sample_by_autograd(copy.deepcopy(net), x, y)
    was = fast_conv2d_enabled()
    try:
        use_fast_conv2d(True)
        gsm = GradSampleModule(copy.deepcopy(net), batch_first=True, loss_reduction="mean")
        assert skip_batch_param_grads(gsm) == 8
        nn.functional.cross_entropy(gsm(x), y).backward()
        for (name, p), want in zip(gsm.named_parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad_sample, want, rtol=1e-4, atol=1e-5, msg=name)
            conv = isinstance(gsm.get_submodule(name.rsplit(".", 1)[0]), nn.Conv2d)
            assert (p.grad is None) == conv, name  # the DP optimizer sets the convs' .grad from grad_sample
    finally:
        use_fast_conv2d(was)


def _fusion_dp(fast: bool, tmp_path, *, batch: int = 8):
    """(DP model, optimizer, engine, batch dict, labels, unwrapped copy) for the fusion model at ``batch``."""
    from benchmarks.dp_step import _Samples
    from fedmed.config import ModelConfig, PrivacyConfig, TrainConfig
    from fedmed.models import build_model
    from fedmed.privacy import make_private, plan_dp
    from fedmed.train.loop import make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32), n_classes=2, in_chans=1, n_numeric=6, cat_cardinalities=[2])
    data = _Samples(4 * batch, 32)
    plan = plan_dp(privacy=PrivacyConfig(enabled=True), n_train=len(data), batch_size=batch, rounds=1,
                   local_epochs=1)
    opt, before = make_optimizer(model, TrainConfig(lr=1e-2)), copy.deepcopy(model)
    dp_model, dp_opt, _, engine = make_private(model, opt, data, plan=plan, fast_conv=fast,
                                               ledger=PrivacyLedger(tmp_path / f"{fast}.json", accountant="rdp"))
    one = default_collate([data[i] for i in range(batch)])
    return dp_model, dp_opt, engine, {k: v for k, v in one.items() if k != "label"}, one["label"], before


def test_dp_step_with_fedmed_samplers_is_opacus_step(tmp_path):
    """A whole DP step on the fusion model, fedmed's path (grouped-conv and chunked GroupNorm
    samplers, convolutions' batch gradients skipped) against Opacus alone, same dropout and
    noise draws: same per-sample gradients, same noised gradient, same update, same ε."""
    runs = {}
    was = fast_conv2d_enabled()
    try:
        for fast in (True, False):
            dp_model, dp_opt, engine, inputs, labels, _ = _fusion_dp(fast, tmp_path)
            skipped = sum(skips_batch_param_grads(m) for m in dp_model.modules())
            assert skipped == (6 if fast else 0)
            dp_opt.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # dropout
            nn.functional.cross_entropy(dp_model(**inputs), labels).backward()
            samples = {n: p.grad_sample.clone() for n, p in dp_model.named_parameters() if p.requires_grad}
            no_grad = {n for n, p in dp_model.named_parameters() if p.requires_grad and p.grad is None}
            torch.manual_seed(2)  # noise
            dp_opt.step()
            runs[fast] = (samples, no_grad, {n: p.grad.clone() for n, p in dp_model.named_parameters()},
                          {n: p.detach().clone() for n, p in dp_model.named_parameters()},
                          engine.get_epsilon(1e-5), list(engine.accountant.history))
    finally:
        use_fast_conv2d(was)
    (fs, fng, fg, fp, feps, fh), (os_, ong, og, op, oeps, oh) = runs[True], runs[False]
    assert len(fng) == 12 and all("backbone" in n for n in fng) and not ong  # 6 convs: weight + bias
    _assert_grad_samples_close(fs, os_)
    for n in op:
        torch.testing.assert_close(fg[n], og[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(fp[n], op[n], rtol=1e-4, atol=1e-6, msg=n)
    assert fh == oh and feps == oeps > 0


def test_skipped_conv_grads_come_back_when_opacus_hooks_are_off(tmp_path):
    """Outside a live DP backward (hooks disabled, eval, no_grad) a wrapped conv is plain
    nn.Conv2d again: its batch gradients are autograd's, its outputs unchanged."""
    dp_model, _, _, inputs, labels, plain = _fusion_dp(True, tmp_path)
    convs = [(n, m) for n, m in dp_model._module.named_modules() if skips_batch_param_grads(m)]
    assert len(convs) == 6
    dp_model.disable_hooks()
    for model in (dp_model, plain):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(**inputs), labels).backward()
    for n, m in convs:
        want = plain.get_submodule(n)
        assert m.weight.grad is not None and m.weight.grad_sample is None
        torch.testing.assert_close(m.weight.grad, want.weight.grad)
        torch.testing.assert_close(m.bias.grad, want.bias.grad)
    dp_model.enable_hooks()
    dp_model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dp_model(**inputs), plain(**inputs))


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
