"""The site's Flower ClientApp: train and evaluate the global model on local data.

Thin glue over :mod:`fedmed.task`: the server's message says *what* to train (model and
training settings), the site's own config says *where* its data is and what it allows.
Replies carry only weights, numbers and the site's name (:mod:`fedmed.messages`).
"""

from __future__ import annotations

import logging
import zlib

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmed.client.site import SiteRuntime, runtime_for
from fedmed.messages import CONFIG_KEY, decode_job, make_reply
from fedmed.train.loop import evaluate, make_optimizer, train_epochs

__all__ = ["app"]

log = logging.getLogger("fedmed.client")
app = ClientApp()


def _prepare(msg: Message, context: Context) -> tuple[SiteRuntime, int]:
    config = msg.content[CONFIG_KEY]
    job = decode_job(config)
    rt = runtime_for(job, context)
    rnd = int(config.get("server-round", 0))
    rt.model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return rt, rnd


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs on the site's training split, FedProx term when the server asks."""
    rt, rnd = _prepare(msg, context)
    config = msg.content[CONFIG_KEY]
    # One seed per (run seed, round, site): reruns and resumed runs repeat exactly.
    rt.reseed(rt.cfg.train.seed + 1000 * rnd + zlib.crc32(rt.site.encode()) % 997)
    lr = float(config.get("lr", rt.cfg.train.lr))
    optimizer = make_optimizer(rt.model, rt.cfg.train, lr=lr)
    stats = train_epochs(
        rt.model, rt.loaders["train"], loss_fn=rt.loss_fn, optimizer=optimizer, device=rt.device,
        epochs=rt.cfg.federation.local_epochs, amp=rt.cfg.train.amp,
        proximal_mu=float(config.get("proximal-mu", 0.0)), grad_clip=rt.cfg.train.grad_clip,
        max_steps_per_epoch=rt.cfg.train.max_steps_per_epoch, desc=f"{rt.site} round {rnd}",
    )
    metrics = {"num-examples": len(rt.loaders["train"].dataset), "train_loss": stats["loss"],
               "train_seconds": stats["seconds"], "train_steps": stats["steps"]}
    arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in rt.model.state_dict().items()})
    return make_reply(msg, site=rt.site, metrics=metrics, arrays=arrays)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Metrics of the global model on the site's own test split; numbers only."""
    rt, _ = _prepare(msg, context)
    m = evaluate(rt.model, rt.loaders["test"], device=rt.device, n_classes=rt.n_classes,
                 amp=rt.cfg.train.amp, loss_fn=rt.loss_fn, multilabel=rt.cfg.model.multilabel)
    metrics = {k: v for k, v in m.items() if k not in ("confusion_matrix", "n")}
    metrics["num-examples"] = int(m.get("n", 0))
    if "confusion_matrix" in m:
        metrics["confusion_matrix"] = [float(x) for row in m["confusion_matrix"] for x in row]
    return make_reply(msg, site=rt.site, metrics=metrics)
