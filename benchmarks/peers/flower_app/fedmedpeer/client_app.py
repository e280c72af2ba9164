"""fedmedpeer: the ClientApp. One simulated SuperNode per hospital site of the cohort."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmedpeer.task import Net, load_config, load_data, round_lr, seed_round
from fedmedpeer.task import train as train_fn

app = ClientApp()


def _site(context: Context, cfg) -> str:
    return list(cfg.data.sites)[int(context.node_config["partition-id"])]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    rc = context.run_config
    cfg = load_config(str(rc["fedmed-config"]), str(rc["cohort"]), rounds=int(rc["num-server-rounds"]),
                      local_epochs=int(rc["local-epochs"]), image_size=int(rc["image-size"]))
    site = _site(context, cfg)
    model = Net(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _, criterion = load_data(cfg, site)
    server_round = int(msg.content["config"]["server-round"])
    seed_round(cfg, server_round, site, trainloader)
    train_loss = train_fn(model, trainloader, epochs=cfg.federation.local_epochs, lr=round_lr(cfg, server_round),
                          criterion=criterion, cfg=cfg, device=torch.device("cpu"))
    arrays = ArrayRecord(model.state_dict())
    metrics = {"train_loss": train_loss, "num-examples": len(trainloader.dataset),
               # what this reply carries: the serialised bytes of its arrays
               "payload-bytes": sum(len(a.data) for a in arrays.values())}
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
