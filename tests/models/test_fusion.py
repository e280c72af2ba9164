from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedmed.config import ModelConfig, NotesConfig
from fedmed.models import FusionModel, build_model

VARIANTS = ["fusion", "image", "record"]
BACKBONES = ["small_cnn", "resnet18"]
N_NUM, CARDS, N_CLASSES = 8, [3, 4], 3
# every variant × backbone; the record variant has no backbone, so it appears once
CASES = [(v, b) for v in VARIANTS for b in BACKBONES if v != "record" or b == BACKBONES[0]]

_CACHE: dict[tuple[str, str], FusionModel] = {}


def _model(variant: str, backbone: str) -> FusionModel:
    """One model per (variant, backbone) for the whole module: building resnet18 is slow."""
    key = (variant, backbone)
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = FusionModel(
            variant=variant, n_classes=N_CLASSES, in_chans=1, n_numeric=N_NUM,
            cat_cardinalities=CARDS, backbone=backbone,
        )
    return _CACHE[key]


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "missing"])
@pytest.mark.parametrize("variant,backbone", CASES)
def test_forward_backward_finite(variant, backbone, missing, make_inputs):
    model = _model(variant, backbone).train()
    batch = make_inputs(4, size=64, missing=missing)
    model.zero_grad()
    logits = model(**batch)
    assert logits.shape == (4, N_CLASSES) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("variant,backbone", CASES)
def test_opacus_validator_accepts(variant, backbone):
    assert ModuleValidator.validate(_model(variant, backbone), strict=False) == []


def test_missing_modality_uses_learned_embedding(make_inputs):
    model = _model("fusion", "small_cnn").eval()
    batch = make_inputs(2, size=32)
    batch["has_image"] = torch.tensor([0.0, 1.0])
    out_a = model(**batch)
    batch["image"] = batch["image"] * 0 + 5.0  # the missing image's pixels must not matter...
    batch["image"][1] = make_inputs(2, size=32)["image"][1]
    out_b = model(**batch)
    torch.testing.assert_close(out_a, out_b)
    batch["has_record"] = torch.tensor([0.0, 1.0])
    out_c = model(**batch)
    batch["num"] = batch["num"] + 3.0  # ...nor a missing record's values
    torch.testing.assert_close(out_c[0], model(**batch)[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_ignore_unused_inputs(variant, make_inputs):
    model = _model(variant, "small_cnn").eval()
    batch = make_inputs(3, size=32)
    if variant == "image":
        only = {"image": batch["image"], "has_image": batch["has_image"]}
    elif variant == "record":
        only = {k: batch[k] for k in ("num", "num_missing", "cat", "has_record")}
    else:
        only = batch
    full = model(**batch, notes_ids=torch.zeros(3, 5, dtype=torch.long))
    torch.testing.assert_close(model(**only), full)


def _per_sample_reference(model, batch, labels):
    refs = []
    for i in range(labels.shape[0]):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in batch.items()}
        torch.nn.functional.cross_entropy(model(**one), labels[i : i + 1]).backward()
        refs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return refs


@pytest.mark.parametrize("notes", [False, True], ids=["no_notes", "notes"])
def test_per_sample_gradients_with_opacus(notes, make_inputs):
    torch.manual_seed(0)
    cfg = NotesConfig(enabled=True, vocab_size=100, max_length=6, hidden_size=16) if notes else None
    model = FusionModel(
        variant="fusion", n_classes=2, in_chans=1, n_numeric=N_NUM, cat_cardinalities=CARDS,
        dropout=0.0, block_dropout=0.0, notes=cfg,
    )
    batch = make_inputs(4, size=32, missing=True)
    if notes:
        batch["notes_ids"] = torch.randint(1, 100, (4, 6))
        batch["notes_mask"] = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 6])
    labels = torch.tensor([0, 1, 1, 0])
    refs = _per_sample_reference(model, batch, labels)
    gsm = GradSampleModule(model)
    gsm.zero_grad()
    torch.nn.functional.cross_entropy(gsm(**batch), labels).backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 4, name
        for i in range(4):
            torch.testing.assert_close(
                p.grad_sample[i], refs[i][name], atol=2e-5, rtol=1e-3, msg=name
            )
    gsm._close()


def test_notes_on_off_shapes(make_inputs):
    cfg = ModelConfig(notes=NotesConfig(enabled=True, vocab_size=100, max_length=6, hidden_size=16))
    model = build_model(cfg, n_classes=2, in_chans=1, n_numeric=N_NUM, cat_cardinalities=CARDS,
                        notes_vocab_size=50)
    assert model.record_branch.notes.bert.config.vocab_size == 50
    batch = make_inputs(3, size=32, missing=True)
    ids = torch.randint(1, 50, (3, 6))
    assert model(**batch, notes_ids=ids, notes_mask=torch.ones_like(ids)).shape == (3, 2)
    with pytest.raises(ValueError, match="notes"):
        model(**batch)
    off = build_model(
        ModelConfig(), n_classes=2, in_chans=1, n_numeric=N_NUM, cat_cardinalities=CARDS
    )
    assert off.record_branch.notes is None
    assert off(**batch, notes_ids=ids).shape == (3, 2)


def test_explanation_hooks(make_inputs):
    model = _model("fusion", "small_cnn").eval()
    feats = {}
    target = model.gradcam_target()
    handle = target.register_forward_hook(lambda m, i, o: feats.setdefault("map", o))
    model(**make_inputs(2, size=64))
    handle.remove()
    assert feats["map"].shape == (2, model.image_branch.backbone.num_features, 8, 8)
    assert model.record_attention().shape == (2, N_NUM + len(CARDS))
    assert model.image_attention().shape == (2, 8, 8)
    with pytest.raises(RuntimeError):
        _model("record", "small_cnn").gradcam_target()


def test_build_model_from_config_and_errors():
    cfg = ModelConfig(variant="image", embed_dim=32, heads=2, fusion_heads=2)
    model = build_model(cfg, n_classes=4, in_chans=3, n_numeric=0, cat_cardinalities=[])
    assert model.variant == "image" and model.record_branch is None
    assert model.classifier.out_features == 4
    with pytest.raises(ValueError, match="variant"):
        FusionModel(variant="both", n_classes=2, in_chans=1, n_numeric=1, cat_cardinalities=[])
    with pytest.raises(ValueError, match="record"):
        FusionModel(variant="record", n_classes=2, in_chans=1, n_numeric=0, cat_cardinalities=[])


def test_tiny_overfit(make_inputs):
    """32 samples whose label is readable from both modalities: > 90% train accuracy."""
    torch.manual_seed(0)
    n = 32
    batch = make_inputs(n, size=16, seed=1)
    labels = (batch["num"][:, 0] > 0).long()
    batch["image"] = batch["image"] * 0.5 + 0.5 * labels.float()[:, None, None, None]
    model = FusionModel(variant="fusion", n_classes=2, in_chans=1, n_numeric=N_NUM,
                        cat_cardinalities=CARDS, embed_dim=32, heads=2, fusion_heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(**batch), labels).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(**batch).argmax(1) == labels).float().mean().item()
    assert acc > 0.9


def test_image_branch_standardises_inputs_outside_the_state_dict():
    """Config mean/std (else the backbone's) are applied in the model, not checkpointed."""
    cfg = ModelConfig(variant="image", embed_dim=32, heads=2, fusion_heads=2,
                      image_mean=[0.78, 0.52, 0.54], image_std=[0.13, 0.15, 0.17])
    model = build_model(cfg, n_classes=2, in_chans=3, n_numeric=0, cat_cardinalities=[])
    branch = model.image_branch
    torch.testing.assert_close(branch.mean.flatten(), torch.tensor([0.78, 0.52, 0.54]))
    torch.testing.assert_close(branch.std.flatten(), torch.tensor([0.13, 0.15, 0.17]))
    assert not any(k.endswith((".mean", ".std")) for k in model.state_dict())
    seen = {}
    handle = branch.backbone.register_forward_pre_hook(lambda _m, inp: seen.update(x=inp[0]))
    model.eval()(image=torch.full((1, 3, 16, 16), 0.78))
    handle.remove()
    assert seen["x"][0, 0].abs().max() < 1e-5  # the mean maps to 0
    gray = FusionModel(variant="image", n_classes=2, in_chans=1, n_numeric=0, cat_cardinalities=[])
    default = gray.image_branch.backbone.default_cfg
    assert gray.image_branch.mean.shape == (1, 1, 1, 1)
    assert float(gray.image_branch.mean) == pytest.approx(sum(default["mean"]) / 3)
    with pytest.raises(ValueError, match="channels"):
        FusionModel(variant="image", n_classes=2, in_chans=3, n_numeric=0, cat_cardinalities=[],
                    image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        FusionModel(variant="image", n_classes=2, in_chans=1, n_numeric=0, cat_cardinalities=[],
                    image_std=[0.0])


def test_pooled_image_feature_is_layer_normed(make_inputs):
    """F_img = LayerNorm(mean of projected tokens): zero mean, unit variance per sample."""
    model = _model("image", "small_cnn").eval()
    batch = make_inputs(3, size=32)
    with torch.no_grad():
        _, pooled = model.image_branch(batch["image"], batch["has_image"])
        branch = model.image_branch
        f = branch.backbone((batch["image"] - branch.mean) / branch.std).flatten(2).transpose(1, 2)
        expected = branch.norm(branch.proj(f).mean(dim=1))
    torch.testing.assert_close(pooled, expected)
