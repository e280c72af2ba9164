"""Privacy cost: DP-SGD step time over the plain step on the fusion model (target ≤ 1.5, issue 18).

Both sides run the production code: the DP side is the model/optimizer that
:func:`fedmed.privacy.make_private` returns (what a site trains with in a DP round), the
plain side the same model with the same optimizer (:func:`fedmed.train.loop.make_optimizer`);
both step through :func:`fedmed.train.loop.train_epochs` on the same fixed batch, interleaved
(plain, DP, plain, DP, ...) in one process so that machine noise hits both alike.

Run: ``python -m benchmarks.dp_step [--batch 32] [--repeats 5] [--steps 5] [--threads N]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from fedmed.config import ModelConfig, PrivacyConfig, TrainConfig
from fedmed.dp_conv import fast_conv2d_enabled, use_fast_conv2d
from fedmed.models import build_model
from fedmed.privacy import DP_CHANNELS_LAST, PrivacyLedger, make_private, plan_dp
from fedmed.train.loop import make_optimizer, train_epochs

__all__ = ["measure", "main"]

N_NUMERIC, CAT_CARDINALITIES = 6, [2]


class _Samples(Dataset):
    """Synthetic fusion samples (image + record) in the sample-dict format sites use."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image = torch.rand(n, 1, size, size, generator=g)
        self.num = torch.randn(n, N_NUMERIC, generator=g)
        self.cat = torch.randint(0, CAT_CARDINALITIES[0] + 1, (n, len(CAT_CARDINALITIES)), generator=g)
        self.label = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "num": self.num[i],
                "num_missing": torch.zeros(N_NUMERIC, dtype=torch.bool), "cat": self.cat[i],
                "has_image": torch.tensor(1.0), "has_record": torch.tensor(1.0), "label": self.label[i]}


def measure(
    *,
    batch: int = 32,
    size: int = 64,
    steps: int = 5,
    repeats: int = 5,
    threads: int | None = None,
    model_cfg: ModelConfig | None = None,
    privacy: PrivacyConfig | None = None,
    fast_conv: bool = True,
) -> dict[str, Any]:
    """Seconds per training step, plain vs DP, and their ratio over ``repeats`` interleaved runs.

    Each run times ``steps`` optimizer steps on one fixed batch of ``batch`` samples
    (``size``×``size`` images, default :class:`ModelConfig`). ``threads`` sets torch's intra-op
    threads for the measurement (None: leave as is); ``fast_conv`` is passed to
    :func:`fedmed.privacy.make_private` (False: Opacus' own samplers, batch conv gradients kept). Returns
    ``plain_s`` / ``dp_s`` (medians), ``ratio_min`` / ``ratio_median`` / ``ratio_max`` and the
    settings measured.
    """
    old_threads, old_conv = torch.get_num_threads(), fast_conv2d_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(batch=batch, size=size, steps=steps, repeats=repeats,
                        model_cfg=model_cfg or ModelConfig(), privacy=privacy or PrivacyConfig(enabled=True),
                        fast_conv=fast_conv)
    finally:  # leave the process as found (threads, Opacus' Conv2d grad sampler)
        torch.set_num_threads(old_threads)
        use_fast_conv2d(old_conv)


def _measure(*, batch: int, size: int, steps: int, repeats: int, model_cfg: ModelConfig,
             privacy: PrivacyConfig, fast_conv: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build_model(model_cfg, n_classes=2, in_chans=1, n_numeric=N_NUMERIC,
                       cat_cardinalities=CAT_CARDINALITIES)
    train_cfg = TrainConfig(batch_size=batch)
    data = _Samples(8 * batch, size)
    one_batch = default_collate([data[i] for i in range(batch)])
    loader = [one_batch] * steps  # same batch every step, for both sides

    plain = copy.deepcopy(base)
    opt_plain = make_optimizer(plain, train_cfg)
    plan = plan_dp(privacy=privacy, n_train=len(data), batch_size=batch, rounds=1, local_epochs=1)
    with tempfile.TemporaryDirectory() as tmp:  # the ledger is only read (and absent): nothing is written
        ledger = PrivacyLedger(Path(tmp) / "ledger.json", accountant=plan.accountant)
        work = copy.deepcopy(base)
        dp_model, opt_dp, _, _ = make_private(work, make_optimizer(work, train_cfg), data, plan=plan, ledger=ledger,
                                              fast_conv=fast_conv)
    loss_fn = torch.nn.CrossEntropyLoss()
    cpu = torch.device("cpu")

    def run(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
        """(wall, process CPU) seconds per step."""
        t, c = time.perf_counter(), time.process_time()
        # each side in the memory format a site trains it in: plain per train.channels_last, DP in NCHW
        train_epochs(model, loader, loss_fn=loss_fn, optimizer=opt, device=cpu, amp=False,
                     channels_last=DP_CHANNELS_LAST if model is dp_model else train_cfg.channels_last)
        return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps

    run(plain, opt_plain), run(dp_model, opt_dp)  # warm-up (allocator, kernels, hooks)
    ratios, cpu_ratios, t_plain, t_dp = [], [], [], []
    for _ in range(repeats):
        a, a_cpu = run(plain, opt_plain)
        b, b_cpu = run(dp_model, opt_dp)
        t_plain.append(a), t_dp.append(b), ratios.append(b / a), cpu_ratios.append(b_cpu / a_cpu)
    # wall-clock ratios are the acceptance number; CPU-time ratios are steadier on a shared machine
    return {"plain_s": statistics.median(t_plain), "dp_s": statistics.median(t_dp),
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
            "ratios": ratios, "cpu_ratio_median": statistics.median(cpu_ratios),
            "batch": batch, "size": size, "steps": steps, "repeats": repeats,
            "threads": torch.get_num_threads(), "fast_conv": fast_conv,
            "noise_multiplier": plan.noise_multiplier}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as set)")
    p.add_argument("--opacus-conv", action="store_true",
                   help="Opacus' own Conv2d/GroupNorm grad samplers, batch conv gradients kept (before/after)")
    a = p.parse_args()
    r = measure(batch=a.batch, size=a.size, steps=a.steps, repeats=a.repeats, threads=a.threads,
                fast_conv=not a.opacus_conv)
    print(f"batch {r['batch']}, {r['size']}px, {r['threads']} thread(s), "
          f"{'fedmed' if r['fast_conv'] else 'Opacus'} Conv2d/GroupNorm grad samplers: "
          f"plain step {r['plain_s'] * 1000:.1f} ms, DP step {r['dp_s'] * 1000:.1f} ms; DP/plain ratio "
          f"min {r['ratio_min']:.2f} median {r['ratio_median']:.2f} max {r['ratio_max']:.2f} (target ≤ 1.5); "
          f"CPU-time ratio median {r['cpu_ratio_median']:.2f}")


if __name__ == "__main__":
    main()
