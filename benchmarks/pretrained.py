"""The pretrained backbone's cost: training images/s and the DP/plain step ratio.

EfficientNet-Lite0 (timm ``efficientnet_lite0``, BatchNorm kept) in the image-only model:
images/s of a full fine-tuning step and of a frozen-backbone step, and the DP-SGD step
(frozen backbone, :func:`fedmed.privacy.make_private`) over the plain step of the same
frozen model, via :func:`benchmarks.dp_step.measure` (interleaved, same batch). Weights do
not change the cost, so the random-init architecture is timed (no file needed); on a GPU
the same code runs with AMP and channels_last when ``--device cuda``.

Run: ``python -m benchmarks.pretrained [--size 128] [--trainable-stages 3] [--batch 32] [--threads 1]``
(defaults: the size and stages of ``configs/ham10000_pretrained.yaml``, the recipe of the results).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.utils.data import default_collate

from benchmarks.dp_step import _Samples
from benchmarks.dp_step import measure as dp_measure
from fedmed.config import ModelConfig, PrivacyConfig, TrainConfig
from fedmed.models import build_model
from fedmed.train.loop import make_optimizer, train_epochs

__all__ = ["measure", "main"]

BACKBONE = "efficientnet_lite0"


def _model_cfg(trainable_stages: int | None) -> ModelConfig:
    return ModelConfig(variant="image", backbone=BACKBONE, dp_compatible=False, trainable_stages=trainable_stages)


def _images_per_s(*, trainable_stages: int | None, batch: int, size: int, steps: int, repeats: int,
                  device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(_model_cfg(trainable_stages), n_classes=7, in_chans=1, n_numeric=0,
                        cat_cardinalities=[]).to(device)
    data = _Samples(batch, size)
    one = default_collate([data[i] for i in range(batch)])
    one["label"] = one["label"] % 7
    loader = [one] * steps
    opt = make_optimizer(model, TrainConfig(batch_size=batch))
    loss_fn = torch.nn.CrossEntropyLoss()
    run = lambda: train_epochs(model, loader, loss_fn=loss_fn, optimizer=opt, device=device,  # noqa: E731
                               amp=True, channels_last=True)
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        s = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(s["samples"] / (time.perf_counter() - t))
    return {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}


def recipe() -> tuple[int, int | None]:
    """The image size and ``model.trainable_stages`` of ``configs/ham10000_pretrained.yaml``: what
    the results in docs/results.md were trained with."""
    from benchmarks.common import ROOT
    from fedmed.config import load_config

    cfg = load_config(ROOT / "configs" / "ham10000_pretrained.yaml", ["model.pretrained_path=null"])
    return cfg.data.image_size, cfg.model.trainable_stages


def measure(*, size: int = 64, batch: int = 32, steps: int = 3, repeats: int = 5, threads: int | None = 1,
            device: str = "cpu", trainable_stages: int | None = None) -> dict[str, Any]:
    """Images/s (full fine-tune, the last ``trainable_stages`` stages fine-tuned when given, frozen
    backbone) and DP/plain step ratio (frozen backbone)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        out: dict[str, Any] = {"backbone": BACKBONE, "size": size, "batch": batch, "device": str(dev),
                               "threads": torch.get_num_threads()}
        out["finetune_images_per_s"] = _images_per_s(trainable_stages=None, batch=batch, size=size, steps=steps,
                                                     repeats=repeats, device=dev)
        if trainable_stages:
            out["trainable_stages"] = trainable_stages
            out["partial_images_per_s"] = _images_per_s(trainable_stages=trainable_stages, batch=batch, size=size,
                                                        steps=steps, repeats=repeats, device=dev)
        out["frozen_images_per_s"] = _images_per_s(trainable_stages=0, batch=batch, size=size, steps=steps,
                                                   repeats=repeats, device=dev)
        if dev.type == "cpu":  # Opacus' DP step, measured on the CPU path the sites use here
            out["dp_frozen"] = dp_measure(batch=batch, size=size, steps=steps, repeats=repeats, threads=threads,
                                          model_cfg=_model_cfg(0), privacy=PrivacyConfig(enabled=True))
        return out
    finally:
        torch.set_num_threads(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, help="image size (default: configs/ham10000_pretrained.yaml's)")
    p.add_argument("--trainable-stages", type=int, help="also time fine-tuning the last N stages (default: the "
                   "config's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    size, stages = recipe()
    r = measure(size=a.size or size, batch=a.batch, steps=a.steps, repeats=a.repeats, threads=a.threads,
                device=a.device, trainable_stages=a.trainable_stages if a.trainable_stages is not None else stages)
    ft, fr = r["finetune_images_per_s"], r["frozen_images_per_s"]
    part = r.get("partial_images_per_s")
    print(f"{BACKBONE} {r['size']}px batch {r['batch']} on {r['device']} ({r['threads']} thread(s)): "
          f"fine-tune {ft['median']:.1f} img/s (min {ft['min']:.1f}, max {ft['max']:.1f}); "
          + (f"last {r['trainable_stages']} stages {part['median']:.1f} img/s; " if part else "")
          + f"frozen backbone {fr['median']:.1f} img/s")
    if "dp_frozen" in r:
        d = r["dp_frozen"]
        print(f"DP (frozen backbone) / plain step: min {d['ratio_min']:.2f} median {d['ratio_median']:.2f} "
              f"max {d['ratio_max']:.2f}; plain {d['plain_s'] * 1000:.0f} ms, DP {d['dp_s'] * 1000:.0f} ms per step")


if __name__ == "__main__":
    main()
