"""Privacy cost: DP-SGD step time over the plain step on the fusion model (target ≤ 2.0).

Same model, same batch, same machine, measured interleaved in one run so machine noise hits
both alike. Run: python -m benchmarks.dp_step [--batch 32] [--repeats 5] [--mode hooks|ew]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedmed.config import ModelConfig
from fedmed.models import build_model


def _batch(b: int, size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(b, 1, size, size, generator=g),
        "num": torch.randn(b, 6, generator=g),
        "num_missing": torch.zeros(b, 6, dtype=torch.bool),
        "cat": torch.randint(0, 3, (b, 1), generator=g),
        "has_image": torch.ones(b), "has_record": torch.ones(b),
    }, torch.randint(0, 2, (b,), generator=g)


def measure(*, batch: int = 32, size: int = 64, steps: int = 10, repeats: int = 5, mode: str = "hooks") -> dict:
    torch.manual_seed(0)
    base = build_model(ModelConfig(), n_classes=2, in_chans=1, n_numeric=6, cat_cardinalities=[2])
    plain = copy.deepcopy(base)
    dp = GradSampleModule(copy.deepcopy(base), batch_first=True, loss_reduction="mean", force_functorch=(mode == "ew"))
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt_dp = DPOptimizer(torch.optim.AdamW(dp.parameters(), lr=1e-4), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=batch)
    x, y = _batch(batch, size)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(model, opt) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(**x), y).backward()
            opt.step()
        return (time.perf_counter() - t) / steps

    run(plain, opt_plain), run(dp, opt_dp)  # warm-up
    ratios, t_plain, t_dp = [], [], []
    for _ in range(repeats):
        a, b = run(plain, opt_plain), run(dp, opt_dp)
        t_plain.append(a), t_dp.append(b), ratios.append(b / a)
    return {"plain_s": statistics.median(t_plain), "dp_s": statistics.median(t_dp),
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="hooks", choices=["hooks", "ew"])
    a = p.parse_args()
    r = measure(batch=a.batch, repeats=a.repeats, mode=a.mode)
    print(f"plain step {r['plain_s'] * 1000:.1f} ms, DP step {r['dp_s'] * 1000:.1f} ms; DP/plain ratio "
          f"min {r['ratio_min']:.2f} median {r['ratio_median']:.2f} max {r['ratio_max']:.2f} (target ≤ 2.0)")


if __name__ == "__main__":
    main()
