"""Secure aggregation: masks cancel in the sum, one site's masked update reveals nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fedmed.config import load_config
from fedmed.secagg import generate_keypair, mask_update, unmask_sum

IDS = [17, 4, 230]
WEIGHTS = {17: 40.0, 4: 25.0, 230: 135.0}


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = {i: generate_keypair() for i in IDS}
    peers = {i: k[1] for i, k in keys.items()}
    updates = {i: {"w": rng.normal(size=(64, 8)).astype(np.float32),
                   "b": rng.normal(size=(8,)).astype(np.float32)} for i in IDS}
    masked = {i: mask_update(updates[i], weight=WEIGHTS[i], self_id=i, private=keys[i][0], peers=peers,
                             round_id=3) for i in IDS}
    return updates, masked


def test_masked_sum_is_fedavg():
    updates, masked = _setup()
    total = sum(WEIGHTS.values())
    out = unmask_sum(list(masked.values()), total_weight=total, dtypes={"w": np.float32, "b": np.float32})
    for name in ("w", "b"):
        plain = sum(updates[i][name] * WEIGHTS[i] for i in IDS) / total
        np.testing.assert_allclose(out[name], plain, atol=1e-5)


def test_server_cannot_read_one_sites_update():
    updates, masked = _setup()
    alone = unmask_sum([masked[4]], total_weight=WEIGHTS[4], dtypes={"w": np.float32})["w"]
    truth = updates[4]["w"]
    corr = np.corrcoef(alone.ravel().astype(np.float64), truth.ravel())[0, 1]
    assert abs(corr) < 0.2                       # unrelated to the real update
    assert np.abs(alone).mean() > 1e6 * np.abs(truth).mean()  # and nowhere near its scale
    # Masked words look uniform over 64 bits: about half of the top bits are set.
    top = (masked[4]["w"] >> np.uint64(63)).mean()
    assert 0.35 < top < 0.65


def test_a_missing_site_leaves_masks_uncancelled():
    updates, masked = _setup()
    partial = unmask_sum([masked[17], masked[230]], total_weight=175.0, dtypes={"w": np.float32})["w"]
    plain = (updates[17]["w"] * 40 + updates[230]["w"] * 135) / 175
    assert np.abs(partial - plain).max() > 1e3


def test_config_refuses_secure_aggregation_with_a_non_sum_strategy(tmp_path):
    from fedmed.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  classes: [a, b]\nfederation:\n  strategy: fedmedian\n  secure_aggregation: true\n")
    with pytest.raises(ConfigError, match="secure_aggregation"):
        load_config(path)


@pytest.mark.slow
def test_secure_federation_equals_plain_fedavg(synth_config, tmp_path):
    """Same seeds, same sites: the securely aggregated global model is FedAvg's.

    Fixed-point encoding differs from float averaging by ~1e-6 per round; a second round of
    training can amplify that in a few weights, so the bound is on the mean and the max.
    """
    from fedmed.simulate import simulate

    states = {}
    for secure in (False, True):
        _, path = synth_config(federation={"rounds": 2, "local_epochs": 1, "evaluate_every": 2,
                                           "secure_aggregation": secure, "central_test": None})
        cfg = load_config(path)
        states[secure] = simulate(cfg, sites=None, out_dir=tmp_path / f"secure-{secure}")
    diffs = np.concatenate([np.abs(states[True].arrays[n] - p).ravel() for n, p in states[False].arrays.items()])
    assert diffs.mean() < 1e-5 and diffs.max() < 5e-3, (diffs.mean(), diffs.max())
    assert [r["sites_trained"] for r in states[True].history][-1]


@pytest.mark.parametrize("mode, cls", [("server-fixed", "DifferentialPrivacyServerSideFixedClipping"),
                                       ("server-adaptive", "DifferentialPrivacyServerSideAdaptiveClipping")])
def test_client_level_dp_wraps_the_strategy(mode, cls):
    from fedmed.config import FederationConfig
    from fedmed.server.strategies import make_strategy

    strategy = make_strategy(FederationConfig(strategy="fedavg", min_sites=3, client_dp=mode,
                                              client_dp_noise=0.05, client_dp_clip=2.0))
    assert type(strategy).__name__ == cls
