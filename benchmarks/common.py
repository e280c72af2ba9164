"""What every benchmark shares: the cohort it runs on, the machine, and ratio statistics."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["cohort", "heart_cohort", "machine", "stats", "bench_config", "site_setup"]

ROOT = Path(__file__).resolve().parent.parent
HEART_SRC = ROOT.parent / "shared" / "data" / "uci-heart-disease"


def cohort(root: Path, *, sites: int = 3, central: int = 200, image_size: int = 64,
           patients: list[int] | None = None) -> Path:
    """The synthetic DICOM + records cohort under ``root`` (written once, then reused)."""
    if not (root / "fedmed-data.yaml").exists():
        from fedmed.data.importers.synth import synthesize

        synthesize(root, sites=sites, central=central, image_size=image_size,
                   patients_per_site=patients, notes=False)
    return root


def heart_cohort(root: Path, *, src: Path = HEART_SRC, central_share: float = 0.25, seed: int = 0) -> Path:
    """UCI heart disease's 4 real hospitals as a benchmark cohort (written once, then reused).

    The real data has no coordinator's set, and a comparison needs one test set that every
    framework scores the same way: each hospital keeps ``1 - central_share`` of its patients
    (stratified by label, ``seed``) and the rest of all four, pooled, become ``central``. Every
    record is copied as the importer wrote it (one row per patient).
    """
    if (root / "fedmed-data.yaml").exists():
        return root
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is missing: the real-data job needs ../shared/data beside the repo")
    import shutil

    import pandas as pd
    from sklearn.model_selection import train_test_split

    from fedmed.data.importers.heart_disease import import_heart_disease

    staging = root.with_name(root.name + ".import")
    shutil.rmtree(staging, ignore_errors=True)
    import_heart_disease(src, staging)
    held = []
    for site in cohort_sites(staging):
        rec = pd.read_csv(staging / site / "records.csv", dtype=str, keep_default_na=False)
        keep, out = train_test_split(rec, test_size=central_share, stratify=rec["label"], random_state=seed)
        (root / site).mkdir(parents=True, exist_ok=True)
        keep.sort_index().to_csv(root / site / "records.csv", index=False)
        held.append(out.sort_index())
    (root / "central").mkdir(parents=True, exist_ok=True)
    pd.concat(held).to_csv(root / "central" / "records.csv", index=False)
    shutil.move(staging / "fedmed-data.yaml", root / "fedmed-data.yaml")  # last: the cohort is complete
    shutil.rmtree(staging)
    return root


def cohort_sites(root: Path) -> list[str]:
    """The site folders of a benchmark cohort (every folder with records but the central set)."""
    return sorted(p.name for p in root.iterdir() if (p / "records.csv").exists() and p.name != "central")


def bench_config(root: Path, overrides: list[str] | None = None, *, config: Path = ROOT / "configs" / "default.yaml"):
    """``config`` (configs/default.yaml) pointed at a benchmark cohort, with ``key=value`` overrides."""
    from fedmed.config import load_config

    sites = cohort_sites(root)
    base = [f"data.root={root}", f"data.sites=[{','.join(sites)}]", "data.notes_column=null",
            "federation.central_test=null", f"federation.min_sites={len(sites)}", "train.progress=false"]
    return load_config(config, base + list(overrides or []))


def site_setup(cfg, site: str, *, cache_dir: str | None = None):
    """A site's bundle, loaders, loss and device, built the way fedmed's own training builds them."""
    from fedmed.device import select_device
    from fedmed.task import load_site_bundle, make_loaders, training_loss

    bundle = load_site_bundle(cfg, sites=[site], progress=False, cache_dir=cache_dir)
    loaders = make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                           num_workers=cfg.data.num_workers)
    device = select_device(cfg.train.device)
    return bundle, loaders, training_loss(cfg, bundle).to(device), device


def stats(values: list[float]) -> dict[str, float]:
    """min / median / max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare runs: CPU, cores, memory, versions, GPU."""
    import flwr
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "os": f"{platform.system()} {platform.release()}", "commit": commit,
            "load_before": round(os.getloadavg()[0], 2)}
