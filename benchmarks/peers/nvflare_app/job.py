"""NVIDIA FLARE peer: fedmed's benchmark job as a FLARE job recipe (FedAvg, PyTorch Client
API), run in FLARE's simulator; then the final global model's central test AUC.

    python job.py --fedmed_config configs/default.yaml --cohort COHORT --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import SimEnv

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # nvflare_model, as the recipe's model path names it, here and in
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))  # FLARE's workers

from nvflare_model import FedmedNet  # noqa: E402 (found through the sys.path entry above)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fedmed_config", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local_epochs", type=int, default=3)
    p.add_argument("--image_size", type=int, default=64)
    args = p.parse_args()
    out = Path(args.out).resolve()
    job = {"fedmed_config": str(Path(args.fedmed_config).resolve()), "cohort": str(Path(args.cohort).resolve()),
           "rounds": args.rounds, "local_epochs": args.local_epochs, "image_size": args.image_size}
    sites = list(FedmedNet(**job).cfg.data.sites)
    train_args = " ".join(f"--{k} {v}" for k, v in job.items()) + f" --payload_dir {out}"
    recipe = FedAvgRecipe(name="fedmed-peer", min_clients=len(sites), num_rounds=args.rounds,
                          model={"path": "nvflare_model.FedmedNet", "args": job},
                          train_script=str(HERE / "client.py"), train_args=train_args)
    run = recipe.execute(SimEnv(clients=sites, num_threads=len(sites), workspace_root=str(out / "workspace")))
    status, where = run.get_status(), run.get_result()
    found = sorted(Path(where).rglob("FL_global_model.pt")) if where else []
    if not found:
        raise SystemExit(f"FLARE run ended ({status}) without a global model under {where}")
    # the final global model on the coordinator's held-out test split, as fedmed scores its own
    from fedmedpeer.task import load_central, test

    model = FedmedNet(**job)
    saved = torch.load(found[0], map_location="cpu", weights_only=False)
    model.load_state_dict(saved.get("model", saved))
    auc = test(model, load_central(model.cfg), torch.device("cpu"))["auc"]
    payload = [b for s in sites if (out / f"{s}.json").exists() for b in json.loads((out / f"{s}.json").read_text())]
    (out / "result.json").write_text(json.dumps({"central_test_auc": auc, "payload_bytes": payload,
                                                 "status": str(status), "finished": time.time()}))
    print(f"FLARE {status}: central test AUC {auc:.4f}")


if __name__ == "__main__":
    main()
