"""benchmarks.dp_cost on one step: its phases add up and it leaves Opacus as it found it."""

from __future__ import annotations

from benchmarks import dp_cost


def test_fusion_phases_and_per_layer_timing_restore_opacus():
    from opacus import GradSampleModule

    from fedmed.dp_conv import fast_conv2d_enabled

    r = dp_cost._measure_one("fusion", steps=1, repeats=1)
    assert r["batch"] == 32 and r["channels"] == 1 and r["size"] == 64  # configs/default.yaml's site batch
    dp, plain = r["dp_ms"], r["plain_ms"]
    assert all(dp[k] > 0 for k in ("forward", "backward", "clip", "noise"))
    assert sum(dp[k] for k in dp_cost.PHASES) <= dp["total"] * 1.05
    # no timing comparison here (one step on a shared machine says nothing): the benchmark reports ratios
    assert set(plain) >= {"forward", "backward", "total"} and plain["total"] > 0
    assert any(k.startswith("Conv2d") for k in r["per_sample_grad_ms_by_layer"])
    # the timing wrappers are gone again: Opacus' samplers are process-wide
    assert all(fn.__name__ != "timed" for fn in GradSampleModule.GRAD_SAMPLERS.values())
    assert fast_conv2d_enabled()
    from opacus.grad_sample import grad_sample_module as gsm_module

    assert gsm_module.create_or_accumulate_grad_sample.__name__ == "create_or_accumulate_grad_sample"
    assert GradSampleModule.rearrange_grad_samples.__name__ == "rearrange_grad_samples"
