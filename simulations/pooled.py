"""Pooled (or one centre's local) training alone, scored exactly as ``fedmed compare`` scores it.

``fedmed compare`` trains every centre alone, then the pool, then the federations; when only
one of those models is wanted (pretrained vs random init, fusion vs image-only, one centre's
local baseline) this runs just that step with the same code: the pool is the union of each
centre's own splits (:func:`fedmed.experiments.compare.pooled_bundle`, so no centre's test
patient is trained on), ``--site NAME`` trains on that centre's own splits alone, training is
:func:`fedmed.experiments.local.train_local`, and the score is each centre's own test split
(:func:`fedmed.experiments.compare.evaluate_on_sites` + :func:`fedmed.experiments.compare.summarise`:
mean per-centre balanced accuracy, the FLamby metric, and the pooled-test macro AUC).

    python simulations/pooled.py -c configs/ham10000_pretrained.yaml --seed 0 --out runs/pooled-s0 [key=value ...]
    python simulations/pooled.py -c configs/ham10000_pretrained.yaml --seed 0 --site rosendahl --out runs/local-s0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmed.config import load_config
from fedmed.device import select_device
from fedmed.experiments.compare import _load, _with, evaluate_on_sites, pooled_bundle, summarise
from fedmed.experiments.local import train_local
from fedmed.experiments.simulate import federation_sites
from fedmed.task import load_site_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site", help="train on this centre alone (its local baseline) instead of the pool")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    dirs = federation_sites(cfg, None)
    if a.site is not None and a.site not in dirs:
        p.error(f"--site {a.site!r} is not one of the config's sites {sorted(dirs)}")
    budget = cfg.federation.rounds * cfg.federation.local_epochs
    cfg = _with(cfg, data={"sites": list(dirs)}, train={"progress": False, "seed": a.seed, "epochs": budget})
    bundles = {s: load_site_bundle(cfg, site_dir=d, progress=False) for s, d in dirs.items()}
    trained = bundles[a.site] if a.site else pooled_bundle(cfg, bundles)
    out = Path(a.out)
    t0 = time.perf_counter()
    res = train_local(cfg, bundle=trained, out_dir=out)
    model = _load(cfg, res["out_dir"] / "model.pt", select_device(cfg.train.device))
    row = summarise(evaluate_on_sites(model, bundles, cfg=cfg, encoder=trained.splits.encoder),
                    n_classes=len(cfg.data.classes))
    method = f"local ({a.site})" if a.site else "pooled"
    row.update(method=method, seed=a.seed, seconds=round(time.perf_counter() - t0, 1), epoch_budget=budget,
               splits={s: {k: int(len(v)) for k, v in b.splits.indices.items()} for s, b in bundles.items()},
               overrides=a.overrides)
    (out / "pooled.json").write_text(json.dumps(row, indent=2, default=float))
    print(f"{method} seed {a.seed}: mean per-centre bAcc {row['mean_bacc']:.3f}  worst {row['worst_bacc']:.3f}  "
          f"pooled-test AUC {row['pooled_auc']:.3f}  ({row['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
