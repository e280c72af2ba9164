"""Trainer efficiency: fedmed's local training throughput over a minimal PyTorch loop (target ≥ 0.95).

Same model weights, same dataset object, same batch size, same optimizer and loss; the
minimal loop is the five lines every PyTorch tutorial has. Epochs alternate between the
two so machine noise hits both alike.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.common import bench_config, cohort, site_setup, stats

__all__ = ["measure"]


def _minimal_epoch(model, loader, loss_fn, optimizer, steps: int) -> tuple[int, float, float]:
    model.train()
    n, t, c = 0, time.perf_counter(), time.process_time()
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        y = batch.pop("label")
        optimizer.zero_grad()
        loss_fn(model(**batch), y).backward()
        optimizer.step()
        n += len(y)
    return n, time.perf_counter() - t, time.process_time() - c


def measure(work: Path, *, repeats: int = 9, steps: int = 4, threads: int = 1) -> dict[str, Any]:
    """``repeats`` alternating runs of ``steps`` batches each; ``threads`` torch threads.

    One thread and short alternating runs keep both sides under the same background load
    (the machine is shared); CPU-time ratios are reported beside the wall-clock ones.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(work, repeats=repeats, steps=steps)
    finally:
        torch.set_num_threads(old)


def _measure(work: Path, *, repeats: int, steps: int) -> dict[str, Any]:
    from fedmed.task import model_from_config, seed_everything
    from fedmed.train.loop import make_optimizer, train_epochs

    root = cohort(work / "cohort")
    cfg = bench_config(root, ["data.sites=[hospital_a]"])
    _, loaders, loss_fn, device = site_setup(cfg, "hospital_a")
    seed_everything(0)
    base = model_from_config(cfg).to(device)
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = make_optimizer(ours, cfg.train)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    dataset = loaders["train"].dataset
    plain_loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(0))

    def fedmed_epoch() -> tuple[float, float]:
        c = time.process_time()
        s = train_epochs(ours, loaders["train"], loss_fn=loss_fn, optimizer=opt_ours, device=device,
                         epochs=1, amp=cfg.train.amp, grad_clip=cfg.train.grad_clip, max_steps_per_epoch=steps)
        return s["samples"] / s["seconds"], s["samples"] / (time.process_time() - c)

    def plain_epoch() -> tuple[float, float]:
        n, sec, cpu = _minimal_epoch(plain, plain_loader, loss_fn, opt_plain, steps)
        return n / sec, n / cpu

    fedmed_epoch(), plain_epoch()  # warm-up: allocator, first-touch of the decoded images
    ours_sps, plain_sps, ratios, cpu_ratios = [], [], [], []
    for _ in range(repeats):
        (a, a_cpu), (b, b_cpu) = fedmed_epoch(), plain_epoch()
        ours_sps.append(a), plain_sps.append(b), ratios.append(a / b), cpu_ratios.append(a_cpu / b_cpu)
    return {"ratio": stats(ratios), "cpu_ratio": stats(cpu_ratios), "fedmed_samples_per_s": stats(ours_sps),
            "minimal_samples_per_s": stats(plain_sps), "samples_per_epoch": steps * cfg.train.batch_size,
            "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(), "device": str(device)}
