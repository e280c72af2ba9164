"""fedmedpeer: the ServerApp. FedAvg over the sites, central test AUC of every round's model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmedpeer.task import Net, load_central, load_config, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_config(str(rc["fedmed-config"]), str(rc["cohort"]), rounds=int(rc["num-server-rounds"]),
                      local_epochs=int(rc["local-epochs"]), image_size=int(rc["image-size"]))
    n_sites = len(cfg.data.sites)
    central = load_central(cfg)
    payload: list[float] = []

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net(cfg)
        model.load_state_dict(arrays.to_torch_state_dict())
        m = test(model, central, torch.device("cpu"))
        return MetricRecord({"auc": m["auc"], "loss": m["loss"], "accuracy": m["accuracy"]})

    class Recorded(FedAvg):
        """FedAvg that also keeps each reply's payload size (for the benchmark's bytes per round)."""

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            payload.extend(float(r.content["metrics"]["payload-bytes"]) for r in replies if r.has_content())
            return super().aggregate_train(server_round, replies)

    strategy = Recorded(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_sites,
                        min_available_nodes=n_sites)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net(cfg).state_dict()),
                            train_config=ConfigRecord({}), num_rounds=cfg.federation.rounds,
                            evaluate_fn=central_eval)
    aucs = {int(r): float(m["auc"]) for r, m in result.evaluate_metrics_serverapp.items()}
    if rc["result"]:
        Path(str(rc["result"])).write_text(json.dumps({
            "central_test_auc": aucs[max(aucs)], "central_auc_by_round": aucs, "payload_bytes": payload,
            "finished": time.time()}))
