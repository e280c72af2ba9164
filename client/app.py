"""The site's Flower ClientApp: train and evaluate the global model on local data.

Thin glue over :mod:`fedmed.task`: the server's message says *what* to train (model and
training settings), the site's own config says *where* its data is and what it allows.
Replies carry only weights, numbers and the site's name (:mod:`fedmed.messages`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmed.calibration import measure, nll_curve
from fedmed.client.guard import privacy_guard
from fedmed.client.local_state import keep_local, restore_local
from fedmed.client.policy import check_local_steps, check_name, check_number, check_number_list
from fedmed.client.site import SiteRuntime, resolve_site, runtime_for
from fedmed.data.dataset import dataset_size
from fedmed.messages import (
    CALIBRATION_ACTION,
    CROSS_SITE_ACTION,
    CURVE_KEY,
    EXTERNAL_EVAL_ACTION,
    PERSONALIZE_ACTION,
    SECAGG_KEY,
    SITE_KEY,
    STATS_ACTION,
    PublicRefusal,
    decode_job,
    make_reply,
    server_arrays,
    server_config,
)
from fedmed.secagg import SecAggRefusal, SiteSession, load_identity, plan_hash
from fedmed.train.loop import make_optimizer, scores, train_epochs
from fedmed.transfer import pack, unpack

__all__ = ["app"]

log = logging.getLogger("fedmed.client")
T = TypeVar("T")
app = ClientApp(mods=[privacy_guard])


def _prepare(msg: Message, context: Context) -> tuple[SiteRuntime, int]:
    config = server_config(msg)
    job = decode_job(config)
    rt = runtime_for(job, context, message_type=msg.metadata.message_type)
    rnd = int(config.get("server-round", 0))
    weights = unpack(server_arrays(msg), rt.model.state_dict())
    rt.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    restore_local(rt.model, context, mode=rt.cfg.federation.bn)  # FedBN: this site's own BatchNorm
    return rt, rnd


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs on the site's training split, FedProx term when the server asks."""
    config = server_config(msg)
    if "secagg-stage" in config:  # check the plan and the peers, open their shares: before any data is read
        plan = plan_hash({k: a.numpy() for k, a in server_arrays(msg).items()}, dict(config))
        _secagg(context, lambda s: s.accept(
            u2=list(config["secagg-u2"]), federation=str(config["federation-id"]),
            round_id=int(config["server-round"]), plan=plan,
            # coordinator input: shares that a short list leaves out, accept() refuses as missing
            inbox=dict(zip(config["secagg-from"], config["secagg-ciphertexts"], strict=False))))
    elif resolve_site(context).secagg.required:
        raise SecAggRefusal("this site sends training updates only under secure aggregation (secagg.required)")
    rt, rnd = _prepare(msg, context)
    # One seed per (run seed, round, site): reruns and resumed runs repeat exactly.
    rt.reseed(rt.cfg.train.seed + 1000 * rnd + zlib.crc32(rt.site.encode()) % 997)
    lr = check_number("lr", config.get("lr", rt.cfg.train.lr), lo=0.0, hi=1.0)  # as train.lr
    mu = check_number("proximal-mu", config.get("proximal-mu", 0.0), lo=0.0, hi=1e3)
    n_train = dataset_size(rt.loaders["train"].dataset)
    check_local_steps(rt.cfg, rt.site_cfg, n_train=n_train)
    metrics: dict = {"num-examples": n_train}
    if rt.cfg.privacy.enabled:
        stats, metrics["epsilon"] = _private_round(rt, lr=lr, mu=mu, rnd=rnd,
                                                   federation=check_name("federation-id",
                                                                         config.get("federation-id", "run")))
    else:
        optimizer = make_optimizer(rt.model, rt.cfg.train, lr=lr)
        stats = train_epochs(
            rt.model, rt.loaders["train"], loss_fn=rt.loss_fn, optimizer=optimizer, device=rt.device,
            epochs=rt.cfg.federation.local_epochs, amp=rt.cfg.train.amp, proximal_mu=mu,
            grad_clip=rt.cfg.train.grad_clip, max_steps_per_epoch=rt.cfg.train.max_steps_per_epoch,
            desc=f"{rt.site} round {rnd}",
        )
    keep_local(rt.model, context, mode=rt.cfg.federation.bn, received=server_arrays(msg))
    metrics.update(train_loss=stats["loss"], train_seconds=stats["seconds"], train_steps=stats["steps"])
    if "secagg-stage" in config:
        arrays = _masked_arrays(rt, config, context, rnd=rnd, weight=metrics["num-examples"])
    else:
        arrays = pack(rt.model.state_dict(), half=bool(config.get("half-updates", False)))
    return make_reply(msg, site=rt.site, metrics=metrics, arrays=arrays)


def _secagg(context: Context, step: Callable[[SiteSession], T]) -> tuple[str, T]:
    """Run one secure-aggregation step on this round's session in ``context.state``.

    A refusal (bad signature, unknown peer, step out of order...) wipes the round's secrets
    in the session and leaves as its fixed text.
    """
    site = resolve_site(context)
    identity = load_identity(site=site.site, signing_key=site.secagg.signing_key,
                             peers_dir=site.secagg.peers_dir, min_sites=site.secagg.min_sites)
    record = context.state.get(SECAGG_KEY)
    state: dict[str, Any] = dict(record) if isinstance(record, ConfigRecord) else {}
    try:
        return site.site, step(SiteSession(identity, state, node_id=int(context.node_id)))
    finally:
        context.state[SECAGG_KEY] = ConfigRecord(state)


@app.query(STATS_ACTION)
def statistics_fn(msg: Message, context: Context) -> Message:
    """Aggregate statistics of this site's data (:mod:`fedmed.stats`): counts with cells below
    the site's ``policy.stats_min_count`` (or the server's larger k) suppressed; no row-level value."""
    from fedmed.client.policy import check_job
    from fedmed.client.site import _check_version
    from fedmed.data.images import ImageCache, Preprocess
    from fedmed.data.site import load_site
    from fedmed.job import site_job_config
    from fedmed.stats import StatsRequest, site_statistics

    config = server_config(msg)
    job = decode_job(config)
    _check_version(job)
    site_cfg = resolve_site(context)
    cfg = site_job_config(job, site_cfg)
    check_job(cfg, site_cfg, message_type=msg.metadata.message_type)
    try:  # the server's numbers are checked before any data is read
        eps = float(config.get("stats-epsilon", 0.0))
        req = StatsRequest(k=int(config.get("stats-k", 0)), bins=int(config.get("stats-bins", 10)),
                           epsilon=eps if eps > 0 else None, delta=float(config.get("stats-delta", 1e-5)),
                           images=bool(config.get("stats-images", True)))
    except (TypeError, ValueError) as exc:
        raise PublicRefusal(f"statistics request refused: {exc}") from None
    site = load_site(site_cfg.data_dir, cfg.data, name=site_cfg.site)
    cache = (ImageCache(cfg.data.cache_dir, Preprocess.from_config(cfg.data))
             if req.images and site.samples["has_image"].any() else None)
    try:
        metrics = site_statistics(site, cfg.data, request=req, site_k=site_cfg.policy.stats_min_count,
                                  cache=cache, seed=int(config.get("server-round", 0)))
    except ValueError as exc:  # "fewer than k patients": fixed words and k
        raise PublicRefusal(str(exc)) from None
    return make_reply(msg, site=site_cfg.site, metrics=metrics)


@app.query()
def secagg(msg: Message, context: Context) -> Message:
    """Secure aggregation's key, share, survivors and unmask steps (:mod:`fedmed.secagg`).

    Only public keys, signatures, encrypted shares and (at unmasking) shares of this
    round's random mask seeds leave; the guard checks each record's fields.
    """
    config = server_config(msg)
    stage, rnd, fid = str(config.get("secagg-stage", "")), int(config["server-round"]), str(config["federation-id"])
    steps = {
        "keys": lambda s: s.advertise(federation=fid, round_id=rnd, plan=bytes(config["secagg-plan"])),
        "share": lambda s: s.share({k: list(config[f"secagg-{k}"]) for k in
                                    ("nodes", "sites", "enc-keys", "mask-keys", "signatures")},
                                   federation=fid, round_id=rnd),
        "survivors": lambda s: s.sign_survivors(list(config["secagg-survivors"]), federation=fid, round_id=rnd),
        "unmask": lambda s: s.unmask(signers=list(config["secagg-signers"]),
                                     signatures=list(config["secagg-signatures"]), federation=fid, round_id=rnd),
    }
    if stage not in steps:
        raise SecAggRefusal("unknown secure-aggregation step")
    site, out = _secagg(context, steps[stage])
    return Message(content=RecordDict({SECAGG_KEY: ConfigRecord(out), SITE_KEY: ConfigRecord({"name": site})}),
                   reply_to=msg)


def _masked_arrays(rt: SiteRuntime, config: Mapping[str, Any], context: Context, *, rnd: int,
                   weight: int) -> ArrayRecord:
    """Secure aggregation, step 3: the example-weighted update plus self- and pairwise masks."""
    packed = pack(rt.model.state_dict())
    _, masked = _secagg(context, lambda s: s.mask({k: a.numpy() for k, a in packed.items()}, weight=weight,
                                                  federation=str(config["federation-id"]), round_id=rnd))
    return ArrayRecord(array_dict={k: Array(v) for k, v in masked.items()})


def _private_round(rt: SiteRuntime, *, lr: float, mu: float, rnd: int, federation: str) -> tuple[dict, float]:
    """One round of DP-SGD on a copy of the global model; returns stats and ε spent so far.

    Raises :class:`BudgetError` (the server sees the site's reason) when the plan exceeds the
    site's caps or its budget is spent; the federation goes on without it.
    """
    import copy

    import torch

    from fedmed.privacy import (
        DP_CHANNELS_LAST,
        BudgetError,
        PrivacyLedger,
        check_caps,
        make_private,
        plan_dp,
        total_epsilon,
    )

    p, site = rt.cfg.privacy, rt.site_cfg
    if mu > 0:
        raise PublicRefusal("FedProx's proximal term is not covered by DP-SGD's per-sample clipping; "
                            "use fedavg, fedadam, ... with privacy.enabled")
    check_caps(p, site)
    train_ds = rt.loaders["train"].dataset
    plan = plan_dp(privacy=p, n_train=dataset_size(train_ds), batch_size=rt.cfg.train.batch_size,
                   rounds=rt.cfg.federation.rounds, local_epochs=rt.cfg.federation.local_epochs)
    state_dir = site.state_path()
    ledger = PrivacyLedger(state_dir / "privacy" / f"{federation}.json", accountant=p.accountant)
    cap = min(p.target_epsilon, site.policy.max_epsilon or float("inf"))
    spent = ledger.epsilon(p.target_delta)
    if site.policy.max_total_epsilon is not None:
        # A new federation id starts a new ledger; the site's total over all of them is capped
        # too (sequential composition: the ε of every federation it trained in add up).
        others = total_epsilon(state_dir / "privacy", delta=p.target_delta, exclude=ledger.path)
        cap = min(cap, site.policy.max_total_epsilon - others)
        if cap <= 0:
            raise BudgetError(f"this site's total privacy budget over all federations is spent "
                              f"(ε={others:.3g} of policy.max_total_epsilon={site.policy.max_total_epsilon:g})")
    projected = ledger.epsilon(p.target_delta, (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round))
    if projected > cap * 1.01:
        raise BudgetError(f"site {rt.site}: privacy budget spent (ε={spent:.3g} of {cap:.3g}; another "
                          f"round would reach {projected:.3g}); it stops training")
    work = copy.deepcopy(rt.model)  # Opacus hooks stay off the cached model
    optimizer = make_optimizer(work, rt.cfg.train, lr=lr)
    gen = torch.Generator().manual_seed(rt.cfg.train.seed + rnd)
    dp_model, dp_opt, loader, engine = make_private(work, optimizer, train_ds, plan=plan, ledger=ledger,
                                                    generator=gen)
    stats = train_epochs(dp_model, loader, loss_fn=rt.loss_fn, optimizer=dp_opt, device=rt.device,
                         epochs=rt.cfg.federation.local_epochs, amp=False, channels_last=DP_CHANNELS_LAST,
                         desc=f"{rt.site} round {rnd} (DP)")
    ledger.record(engine.accountant.history)
    rt.model.load_state_dict(dp_model._module.state_dict())
    return stats, ledger.epsilon(p.target_delta)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Metrics of the global model on the site's own test split, and on its val split under ``val_``
    names (what the coordinator selects rounds by when it holds no validation set: never the test
    split); numbers only."""
    rt, _ = _prepare(msg, context)
    config = server_config(msg)
    temps = None  # the last round asks for the val split's NLL curve too: the calibration's fit step
    if "temperatures" in config and not rt.cfg.model.multilabel:
        temps = np.asarray(check_number_list("temperatures", config.get("temperatures"), rt.site_cfg))
    val, test = rt.outputs("val", "test")
    metrics: dict[str, Any] = {}
    for prefix, out in (("val_", val), ("", test)):  # test last: its confusion matrix is sent
        m = scores(out, n_classes=rt.n_classes, multilabel=rt.cfg.model.multilabel)
        metrics.update({prefix + k: v for k, v in m.items() if k not in ("confusion_matrix", "n")})
        metrics[prefix + "num-examples"] = int(m.get("n", 0))
    if temps is not None and len(val.labels):
        metrics["val_" + CURVE_KEY] = nll_curve(val.logits, val.labels, temps).tolist()
    if "confusion_matrix" in m:
        metrics["confusion_matrix"] = [float(x) for row in m["confusion_matrix"] for x in row]
    return make_reply(msg, site=rt.site, metrics=metrics)


@app.evaluate(CALIBRATION_ACTION)
def calibration_fn(msg: Message, context: Context) -> Message:
    """Temperature scaling of the final model at this site (:mod:`fedmed.calibration`).

    ``"calibration": "fit"``: the summed NLL of the val split at each of the server's
    ``temperatures``; ``"measure"``: the test split's ECE/NLL at T = 1 and at ``temperature``
    and its reliability-bin sums. Numbers only; an empty split sends ``num-examples`` 0.
    """
    rt, _ = _prepare(msg, context)
    config = server_config(msg)
    if rt.cfg.model.multilabel:
        raise PublicRefusal("temperature scaling here is for single-label (softmax) models")
    step = str(config.get(CALIBRATION_ACTION, ""))
    if step not in ("fit", "measure"):
        raise PublicRefusal("unknown calibration step: expected 'fit' or 'measure'")
    # The server's numbers are checked before any data is touched.
    if step == "fit":
        temps = np.asarray(check_number_list("temperatures", config.get("temperatures"), rt.site_cfg))
    else:
        temperature = check_number("temperature", config.get("temperature"))
    (out,) = rt.outputs("val" if step == "fit" else "test")  # the last round's evaluation computed it
    z, y = out.logits, out.labels
    metrics: dict = {"num-examples": len(y)}
    if len(y) and step == "fit":
        metrics[CURVE_KEY] = nll_curve(z, y, temps).tolist()
    elif len(y):
        metrics = measure(z, y, temperature=temperature)
    return make_reply(msg, site=rt.site, metrics=metrics)


@app.evaluate(EXTERNAL_EVAL_ACTION)
def external_evaluate_fn(msg: Message, context: Context) -> Message:
    """``fedmed-server --evaluate``: a saved model scored on this site's data, no training.

    Builds no optimiser and no training loader; numbers only (:mod:`fedmed.client.evaluation`).
    """
    from fedmed.client.evaluation import evaluate_saved_model
    from fedmed.client.site import job_config
    from fedmed.task import model_from_config

    config = server_config(msg)
    site_cfg = resolve_site(context)
    cfg = job_config(decode_job(config), site_cfg, message_type=msg.metadata.message_type)
    weights = unpack(server_arrays(msg), model_from_config(cfg).state_dict())
    metrics = evaluate_saved_model(cfg, site_cfg, weights, dict(config))
    return make_reply(msg, site=site_cfg.site, metrics=metrics)


@app.evaluate(PERSONALIZE_ACTION)
def personalize_fn(msg: Message, context: Context) -> Message:
    """``federation.personalize``: fine-tune the final model here, keep it here, send metrics only."""
    from fedmed.client.personalize import personalize_at_site

    rt, _ = _prepare(msg, context)
    metrics = personalize_at_site(rt, dict(server_config(msg)))
    return make_reply(msg, site=rt.site, metrics=metrics)


@app.evaluate(CROSS_SITE_ACTION)
def cross_site_fn(msg: Message, context: Context) -> Message:
    """``federation.cross_site``: train a local model from the sent start ("train"), or score
    a model on this site's test split ("score"); weights leave only as the site's policy allows."""
    from fedmed.client.crosssite import score_model, train_local_model

    rt, _ = _prepare(msg, context)
    config = dict(server_config(msg))
    step = str(config.get(CROSS_SITE_ACTION, ""))
    if step == "train":
        metrics, arrays = train_local_model(rt, config)
        return make_reply(msg, site=rt.site, metrics=metrics, arrays=arrays)
    if step == "score":
        return make_reply(msg, site=rt.site, metrics=score_model(rt, config))
    raise PublicRefusal("unknown cross-site step: expected 'train' or 'score'")
