"""Explanations: Grad-CAM, record attention, modality contribution and ``fedmed explain``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedmed.checkpoint import load_checkpoint
from fedmed.cli import main as fedmed_main
from fedmed.config import load_config
from fedmed.experiments.local import train_local
from fedmed.explain import (
    central_mass,
    explain,
    grad_cam,
    modality_contribution,
    record_attention,
)
from fedmed.heldout import site_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_MODELS: dict[str, object] = {}


@pytest.fixture
def trained(synth_config, tmp_path_factory):
    """A fusion and an image-only model trained 3 epochs on hospital_a (trained once per module)."""
    if not _MODELS:
        out = tmp_path_factory.mktemp("explain-models")
        for variant in ("fusion", "image"):
            _, path = synth_config(model={"variant": variant}, train={"epochs": 3, "patience": 0})
            res = train_local(load_config(path), sites=["hospital_a"], out_dir=out / variant)
            _MODELS[variant] = res["out_dir"] / "model.pt"
    return _MODELS


def _batch(path, synth_root, n=12):
    ckpt = load_checkpoint(path)
    model, cfg = ckpt.build_model(), ckpt.config
    data = site_split(cfg, synth_root / "hospital_a", split="test", encoder_state=ckpt.encoder)
    items = [data[i] for i in range(n)]
    return model, cfg, {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_grad_cam_shape_range_finite(trained, synth_root):
    model, cfg, batch = _batch(trained["fusion"], synth_root)
    cam = grad_cam(model, batch)
    assert cam.shape == (12, 32, 32)
    assert np.isfinite(cam).all() and cam.min() >= 0.0 and cam.max() <= 1.0 + 1e-6
    assert grad_cam(model, batch, target=0).shape == cam.shape


class _Split(nn.Module):
    """Two channels: the image inside the top-left quadrant, and outside it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.zeros_like(x[:, :1])
        m[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 1.0
        return torch.cat([x[:, :1] * m, x[:, :1] * (1 - m)], dim=1)


class _QuadrantModel(nn.Module):
    """Logit 1 = sum of the top-left channel (a known answer); optionally via tokens."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.backbone = _Split()
        self.tok = nn.Identity()
        self.tokens = tokens

    def gradcam_target(self) -> nn.Module:
        return self.tok if self.tokens else self.backbone

    def forward(self, image, **_):
        f = self.backbone(image)
        if self.tokens:  # (B, h*w, C) tokens, no prefix token
            f = self.tok(f.flatten(2).transpose(1, 2)).transpose(1, 2)
        score = f[:, 0].flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.mark.parametrize("tokens", [False, True])
def test_grad_cam_localises_known_region(tokens):
    cam = grad_cam(_QuadrantModel(tokens), {"image": torch.rand(2, 1, 16, 16) + 0.1}, target=1)
    assert cam.shape == (2, 16, 16)
    # bilinear upsampling from a 16x16 grid is the identity, so the border is exact
    assert cam[:, :8, :8].sum() / cam.sum() > 0.99


def test_central_mass_reference_values():
    assert central_mass(np.ones((32, 32))) == pytest.approx(0.25)
    centre = np.zeros((32, 32))
    centre[12:20, 12:20] = 1.0
    assert central_mass(centre) == pytest.approx(1.0)
    border = np.ones((32, 32))
    border[8:24, 8:24] = 0.0
    assert central_mass(border) == pytest.approx(0.0)
    assert np.isnan(central_mass(np.zeros((8, 8))))


def test_record_attention_sums_to_one(trained, synth_root):
    model, cfg, batch = _batch(trained["fusion"], synth_root)
    w = record_attention(model, batch)
    assert w.shape == (12, len(cfg.data.numeric) + len(cfg.data.categorical))
    rows = batch["has_record"].numpy() > 0
    np.testing.assert_allclose(w[rows].sum(axis=1), 1.0, atol=1e-5)
    assert (w[rows] >= 0).all()


def test_modality_contribution(trained, synth_root):
    model, _, batch = _batch(trained["fusion"], synth_root)
    res = modality_contribution(model, batch)
    assert np.abs(res["contribution_image"]).max() > 1e-4
    assert np.abs(res["contribution_record"]).max() > 1e-4
    ok = np.isfinite(res["share_image"])
    np.testing.assert_allclose(res["share_image"][ok] + res["share_record"][ok], 1.0)

    img_model, _, batch = _batch(trained["image"], synth_root)
    res = modality_contribution(img_model, batch)
    np.testing.assert_allclose(res["contribution_record"], 0.0, atol=1e-7)
    assert np.abs(res["contribution_image"]).max() > 1e-4


def test_explain_writes_pngs_and_html_without_ids(trained, synth_root, tmp_path):
    out = tmp_path / "explain"
    page = explain(trained["fusion"], site_dir=synth_root / "hospital_a", out_dir=out, patients=4)
    names = sorted(p.name for p in out.iterdir())
    assert {"case_1.png", "case_4.png", "record_1.png", "contributions.png", "explain.html"} <= set(names)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    text = page.read_text()
    assert "case_1.png" in text and "record_1.png" in text and "contributions.png" in text
    ids = pd.read_csv(synth_root / "hospital_a" / "records.csv", dtype={"patient_id": str})["patient_id"]
    images = pd.read_csv(synth_root / "hospital_a" / "images.csv")["image"].map(lambda p: p.split("/")[-1])
    for needle in [*ids, *images]:
        assert needle not in text
        assert not any(needle in n for n in names)
    assert needle not in (out / "explain.json").read_text()


def test_cli_explain_errors(trained, synth_root, tmp_path, capsys):
    out = tmp_path / "cli"
    code = fedmed_main(["explain", str(trained["image"]), "--site-dir", str(synth_root / "hospital_a"),
                        "--errors", "3", "--out", str(out)])
    assert code == 0
    assert "central_mass_correct_mean" in capsys.readouterr().out
    assert (out / "explain.html").exists() and not list(out.glob("record_*.png"))


def test_cli_explain_several_sites_writes_a_weighted_summary(trained, synth_root, tmp_path, capsys):
    out = tmp_path / "multi"
    sites = [synth_root / "hospital_a", synth_root / "hospital_b"]
    code = fedmed_main(["explain", str(trained["image"]), "--patients", "2", "--out", str(out),
                        *[a for s in sites for a in ("--site-dir", str(s))]])
    assert code == 0
    printed = capsys.readouterr().out
    assert "hospital_a" in printed and "hospital_b" in printed and "central mass" in printed
    rows = json.loads((out / "explain-summary.json").read_text())
    assert set(rows) == {"hospital_a", "hospital_b", "all"}
    for s in sites:
        assert (out / f"explain-{s.name}" / "explain.html").exists()
    a, b, total = rows["hospital_a"], rows["hospital_b"], rows["all"]
    assert total["test_samples"] == a["test_samples"] + b["test_samples"]
    n_a, n_b = a["central_mass_correct_n"], b["central_mass_correct_n"]
    assert total["central_mass_correct_n"] == n_a + n_b > 0
    want = (a["central_mass_correct_mean"] * n_a + b["central_mass_correct_mean"] * n_b) / (n_a + n_b)
    assert total["central_mass_correct_mean"] == pytest.approx(want)
    assert 0.0 <= total["central_mass_correct_above_half"] <= total["central_mass_correct_above_uniform"] <= 1.0
    code = fedmed_main(["explain", str(trained["image"]), "--site-dir", str(sites[0]),
                        "--site-dir", str(sites[0])])
    assert code != 0 and "names a site twice" in capsys.readouterr().err


def _patients(ds) -> set[str]:
    if isinstance(ds, torch.utils.data.Subset):
        return set(ds.dataset.samples.iloc[list(ds.indices)]["patient_id"])
    return set(ds.samples["patient_id"])


def test_a_pool_of_site_splits_is_explained_on_each_sites_own_test_split(synth_config, tmp_path):
    """``fedmed compare``'s pooled model held out each site's own test patients: explaining (or
    calibrating) it on a freshly split pool would score some of its training patients as test."""
    from pathlib import Path

    from fedmed.experiments.compare import pooled_bundle
    from fedmed.heldout import trained_pooled
    from fedmed.task import load_site_bundle

    _, path = synth_config(model={"variant": "image"}, train={"epochs": 1, "patience": 0},
                           data={"sites": ["hospital_a", "hospital_b"]})
    cfg = load_config(path)
    dirs = {s: Path(cfg.data.root) / s for s in cfg.data.sites or []}
    bundles = {s: load_site_bundle(cfg, site_dir=d, progress=False) for s, d in dirs.items()}
    pool = pooled_bundle(cfg, bundles)
    ckpt = train_local(cfg, bundle=pool, out_dir=tmp_path / "site-splits")["out_dir"] / "model.pt"
    assert json.loads((ckpt.parent / "metrics.json").read_text())["pool"] == "site-splits"
    assert not trained_pooled(ckpt)
    trained_on = _patients(pool.splits.train)
    own_test = _patients(bundles["hospital_a"].splits.test)
    held_out = _patients(site_split(cfg, dirs["hospital_a"], split="test", pooled=trained_pooled(ckpt)))
    assert held_out == own_test and not held_out & trained_on
    # a pool split afresh (fedmed train-local --pooled) is still explained on its own split, and
    # that split's test rows are not the site-splits pool's: they hold some of its training patients
    fresh = train_local(cfg, sites=list(dirs), out_dir=tmp_path / "fresh")["out_dir"] / "model.pt"
    assert trained_pooled(fresh)
    assert _patients(site_split(cfg, dirs["hospital_a"], split="test", pooled=True)) & trained_on
