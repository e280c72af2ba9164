"""NVIDIA FLARE peer: a site's training script, written as FLARE's hello-pt client is written
(Client API: init, receive, train, send), on fedmed's model, data and loss (fedmedpeer.task)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nvflare.client as flare
import torch
from fedmedpeer.task import load_data, round_lr, seed_round
from fedmedpeer.task import train as train_fn
from nvflare.fuel.utils import fobs
from nvflare_model import FedmedNet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fedmed_config", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--local_epochs", type=int, required=True)
    p.add_argument("--image_size", type=int, required=True)
    p.add_argument("--payload_dir", default="")
    args = p.parse_args()

    flare.init()
    site = flare.get_site_name()
    model = FedmedNet(fedmed_config=args.fedmed_config, cohort=args.cohort, rounds=args.rounds,
                      local_epochs=args.local_epochs, image_size=args.image_size)
    cfg = model.cfg
    trainloader, _, criterion = load_data(cfg, site)
    payload: list[int] = []
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        model.load_state_dict(input_model.params)
        server_round = input_model.current_round + 1  # FLARE counts rounds from 0
        seed_round(cfg, server_round, site, trainloader)
        loss = train_fn(model, trainloader, epochs=cfg.federation.local_epochs, lr=round_lr(cfg, server_round),
                        criterion=criterion, cfg=cfg, device=torch.device("cpu"))
        params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # what this reply carries, serialised by FLARE's own serializer (the server expects numpy)
        payload.append(len(fobs.dumps({k: v.numpy() for k, v in params.items()})))
        # FLARE's FedAvg weights each site by NUM_STEPS_CURRENT_ROUND; fedmed and Flower weight by
        # training examples, so that is what is sent, for the same average.
        flare.send(flare.FLModel(params=params, metrics={"train_loss": loss},
                                 meta={"NUM_STEPS_CURRENT_ROUND": len(trainloader.dataset)}))
    if args.payload_dir:
        Path(args.payload_dir, f"{site}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
