"""Temperature scaling and reliability diagrams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmed.calibration import (
    BIN_KEYS,
    N_BINS,
    bin_stats,
    calibrate,
    combine_measures,
    ece_from_bins,
    fit_temperature,
    fit_temperature_from_curves,
    measure,
    merge_bins,
    nll_curve,
    plot_reliability,
    reliability_diagram,
    temperature_grid,
)
from fedmed.metrics import expected_calibration_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _overconfident(n: int, seed: int, *, scale: float = 4.0, classes: int = 3):
    """Logits of a ~70 % accurate classifier, then multiplied by ``scale`` (over-confident)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = rng.normal(0, 1, (n, classes))
    z[np.arange(n), y] += 1.5
    return z * scale, y


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _nll(z, y):
    return float(-np.log(_softmax(z)[np.arange(len(y)), y]).mean())


def test_temperature_fixes_overconfidence():
    zv, yv = _overconfident(2000, 0)
    zt, yt = _overconfident(2000, 1)
    t = fit_temperature(zv, yv)
    assert t > 1.0  # over-confident → soften
    assert fit_temperature(zv / 4.0, yv) * 4.0 == pytest.approx(t, rel=1e-3)  # scale-equivariant
    assert expected_calibration_error(yt, _softmax(zt / t)) < expected_calibration_error(yt, _softmax(zt))
    assert _nll(zt / t, yt) < _nll(zt, yt)
    assert (_softmax(zt / t).argmax(1) == _softmax(zt).argmax(1)).all()


def test_underconfident_gets_t_below_one():
    z, y = _overconfident(2000, 2, scale=0.3)
    assert fit_temperature(z, y) < 1.0


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros((4, 3)), np.zeros(5))


def test_federated_fit_matches_central():
    z, y = _overconfident(3000, 3)
    parts = np.array_split(np.arange(3000), 3)  # three sites
    grid = temperature_grid()
    t_fed = fit_temperature_from_curves([nll_curve(z[p], y[p], grid) for p in parts], grid)
    step = grid[1] / grid[0]
    assert fit_temperature(z, y) == pytest.approx(t_fed, rel=step - 1 + 1e-6)


def test_reliability_diagram_png(tmp_path):
    z, y = _overconfident(500, 4)
    path = reliability_diagram(_softmax(z), y, path=tmp_path / "rel.png", title="synthetic")
    assert path.read_bytes()[:8] == PNG_MAGIC


class _Scaled(torch.nn.Module):
    """A 'model' that returns stored logits for sample indices: calibrate() end to end."""

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("z", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, idx, **_):
        return self.z[idx]


def test_calibrate_end_to_end(tmp_path):
    zv, yv = _overconfident(1500, 5)
    zt, yt = _overconfident(1500, 6)
    model = _Scaled(np.concatenate([zv, zt]))
    idx = torch.arange(3000)

    def loader(lo, hi, y):
        ds = TensorDataset(idx[lo:hi], torch.as_tensor(y))
        return DataLoader(ds, batch_size=256, collate_fn=lambda b: {
            "idx": torch.stack([i for i, _ in b]), "label": torch.stack([t for _, t in b])})

    res = calibrate(model, loader(0, 1500, yv), loader(1500, 3000, yt), out_dir=tmp_path)
    assert res["temperature"] > 1.0
    assert res["ece_after"] < res["ece_before"] and res["nll_after"] < res["nll_before"]
    for name in ("reliability_before.png", "reliability_after.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "calibration.html").exists() and (tmp_path / "calibration.json").exists()


# -- federated measuring: bin statistics that add up across sites ---------------------------
@pytest.mark.parametrize("n, seed, scale", [(500, 7, 4.0), (37, 8, 0.3), (1, 9, 1.0)])
def test_ece_from_bins_equals_metrics_ece(n, seed, scale):
    z, y = _overconfident(n, seed, scale=scale)
    p = _softmax(z)
    bins = bin_stats(p, y)
    assert [len(bins[k]) for k in BIN_KEYS] == [N_BINS] * 3
    assert sum(bins["count"]) == n
    assert ece_from_bins(bins) == pytest.approx(expected_calibration_error(y, p), abs=1e-12)


def test_site_bins_merge_to_the_pooled_ece_and_nll():
    """Three sites' measure() results combine to exactly what the pooled test set gives."""
    z, y = _overconfident(900, 10)
    parts = [np.arange(0, 100), np.arange(100, 450), np.arange(450, 900)]
    t = 2.5
    per_site = {f"s{i}": measure(z[p], y[p], temperature=t) for i, p in enumerate(parts)}
    pooled = combine_measures(per_site)
    whole = measure(z, y, temperature=t)
    assert pooled["num-examples"] == 900
    for key in ("ece_before", "ece_after"):
        assert pooled[key] == pytest.approx(whole[key], abs=1e-12)
        assert pooled[key] != pytest.approx(np.mean([m[key] for m in per_site.values()]), abs=1e-6)
    for key in ("nll_before", "nll_after", "accuracy"):
        assert pooled[key] == pytest.approx(whole[key], rel=1e-12)
    assert pooled["ece_before"] == pytest.approx(expected_calibration_error(y, _softmax(z)), abs=1e-12)
    assert pooled["ece_after"] == pytest.approx(expected_calibration_error(y, _softmax(z / t)), abs=1e-12)
    assert pooled["nll_after"] == pytest.approx(_nll(z / t, y), rel=1e-9)
    assert pooled["ece_after"] < pooled["ece_before"]
    assert pooled["bins_after_count"] == whole["bins_after_count"]


def test_combine_measures_skips_empty_sites_and_rejects_none():
    z, y = _overconfident(50, 11)
    one = measure(z, y, temperature=1.0)
    assert combine_measures({"a": one, "b": {"num-examples": 0}})["ece_before"] == pytest.approx(one["ece_before"])
    with pytest.raises(ValueError, match="no site"):
        combine_measures({"b": {"num-examples": 0}})
    with pytest.raises(ValueError, match="number of bins"):
        merge_bins([bin_stats(_softmax(z), y), bin_stats(_softmax(z), y, n_bins=10)])
    with pytest.raises(ValueError, match="temperature"):
        measure(z, y, temperature=0.0)


def test_plot_reliability_from_summed_bins(tmp_path):
    z, y = _overconfident(300, 12)
    a, b = bin_stats(_softmax(z[:100]), y[:100]), bin_stats(_softmax(z[100:]), y[100:])
    path = plot_reliability(merge_bins([a, b]), path=tmp_path / "sum.png", title="two sites")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert ece_from_bins({k: [0.0] * N_BINS for k in BIN_KEYS}) != ece_from_bins(a)  # NaN when empty
