"""Data path: an epoch served from the decoded-image cache over the first epoch, which has
to read and decode every DICOM (lower is better).

Cold: an empty cache folder, so loading the site decodes every file, then one pass over the
training loader (what the trainer consumes). Warm: the same with a new cache object on the
filled folder (what a site's next run sees). Both are measured without the model (data
only: the part the cache changes) and with one training epoch on top.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_config, cohort, site_setup, stats

__all__ = ["measure"]


def _epoch(cfg, cache_dir: Path, *, train: bool) -> float:
    from fedmed.task import model_from_config, seed_everything
    from fedmed.train.loop import make_optimizer, train_epochs

    t = time.perf_counter()
    _, loaders, loss_fn, device = site_setup(cfg, "hospital_a", cache_dir=str(cache_dir))
    if not train:
        for _ in loaders["train"]:
            pass
        return time.perf_counter() - t
    seed_everything(0)
    model = model_from_config(cfg).to(device)
    train_epochs(model, loaders["train"], loss_fn=loss_fn, optimizer=make_optimizer(model, cfg.train),
                 device=device, epochs=1, amp=cfg.train.amp)
    return time.perf_counter() - t


def measure(work: Path, *, repeats: int = 3) -> dict[str, Any]:
    root = cohort(work / "cohort")
    cfg = bench_config(root, ["data.sites=[hospital_a]"])
    out: dict[str, Any] = {}
    for train in (False, True):
        cold, warm, ratios = [], [], []
        for i in range(repeats if not train else max(1, repeats - 1)):
            cache = work / f"image-cache-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            c = _epoch(cfg, cache, train=train)
            w = _epoch(cfg, cache, train=train)
            cold.append(c), warm.append(w), ratios.append(w / c)
            shutil.rmtree(cache, ignore_errors=True)
        key = "train_" if train else ""
        out.update({f"{key}ratio": stats(ratios), f"{key}cold_s": stats(cold), f"{key}warm_s": stats(warm)})
    return out
