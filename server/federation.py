"""The round driver: Flower strategies' hooks, plus what hospitals need around them.

``Strategy.start`` runs rounds but cannot resume, screen updates or report per site, so
fedmed drives the same public hooks (``configure_train`` → ``send_and_receive`` →
``aggregate_train``, then evaluation) itself and adds: waiting for the minimum number of
sites with a timeout, rejecting NaN/Inf or mis-shaped updates (naming the site), per-site
and worst-site evaluation, central evaluation, per-round checkpoints and ``--resume``; after
the last round, temperature scaling of the best model (:mod:`fedmed.server.calibration`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmed.calibration import temperature_grid
from fedmed.config import FedmedConfig
from fedmed.errors import RunTimeout, UsageError
from fedmed.job import job_for_sites
from fedmed.messages import (
    CONFIG_KEY,
    CURVE_KEY,
    JOB_KEY,
    SECAGG_KEY,
    Rejected,
    encode_job,
    failure_text,
    number,
    record_of,
    reply_site,
    screen_metric_replies,
    screen_train_replies,
)
from fedmed.secagg import check_reply_record, plan_hash, rebuild_secret, unmask_sum
from fedmed.server.calibration import CentralLogits, calibrate_federation
from fedmed.server.checkpoint import FederationState, final_arrays, final_model, load_state, save_model, save_state
from fedmed.server.selection import selection
from fedmed.server.strategies import make_strategy
from fedmed.task import model_from_config, seed_everything
from fedmed.transfer import pack, unpack, widen

__all__ = ["run_federation", "aggregate_site_metrics", "round_lr", "send_and_receive", "push_messages",
           "collect_replies"]

log = logging.getLogger("fedmed.server")

HEADLINE = ("accuracy", "balanced_accuracy", "auc", "f1", "sensitivity", "specificity", "ece", "loss")


class GridLike(Protocol):
    def get_node_ids(self) -> Any: ...
    def push_messages(self, messages: Any) -> Any: ...
    def pull_messages(self, message_ids: Any) -> Any: ...


def send_and_receive(grid: GridLike, messages: Any, *, timeout: float, poll: float = 0.2) -> list[Message]:
    """``Grid.send_and_receive`` with a short poll: Flower's sleeps 3 s between pulls, which a
    site's reply then waits out on every message (the benchmarks measured it per round).
    Uses the Grid's public push/pull API; returns the replies that came within ``timeout``."""
    return collect_replies(grid, push_messages(grid, messages), timeout=timeout, poll=poll)


def push_messages(grid: GridLike, messages: Any) -> set[str]:
    """Send ``messages``; the ids whose replies :func:`collect_replies` waits for."""
    return set(grid.push_messages(messages))


def collect_replies(grid: GridLike, pending: set[str], *, timeout: float, poll: float = 0.2,
                    expect: float | None = None) -> list[Message]:
    """The replies to ``pending`` that come within ``timeout`` s, pulled every ``poll`` s.

    ``expect``: seconds after which the last reply is likely (a training round's own earlier
    length). Only the last reply ends the round, so the pulls start ``SLOW_POLL`` apart and
    close in on that time (a tenth of what is left, at least ``LAST_POLL``), then stay
    ``LAST_POLL`` apart: the round still ends within a pull of its last reply, and the
    SuperLink, which shares the sites' CPU on one machine, answers fewer pulls.
    """
    pending = set(pending)
    start = time.monotonic()
    deadline = start + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            if expect is None:
                time.sleep(poll)
            else:
                early = start + expect - time.monotonic()
                time.sleep(min(max(APPROACH * early, LAST_POLL), SLOW_POLL))
    return replies


# collect_replies' pulls of a training round: SLOW_POLL apart until the expected last reply is
# near, then a tenth (APPROACH) of the time left, LAST_POLL apart once it is due.
SLOW_POLL, LAST_POLL, APPROACH = 0.5, 0.1, 0.1
FAST_POLL = 0.05  # the pulls of evaluation and calibration exchanges (about a second long)
EXPECT_SHARE = 0.9  # a round's last reply is expected after this share of the shortest round so far


@dataclass
class _OpenRound:
    """A trained and aggregated round whose central scores may still be computing."""

    row: dict[str, Any]
    arrays: dict[str, np.ndarray]
    central: Future[tuple[dict[str, dict[str, Any]], float]] | None
    t0: float
    overlapped: bool


def _timed(fn: Callable[[dict[str, np.ndarray]], dict[str, dict[str, Any]]],
           arrays: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, Any]], float]:
    t = time.perf_counter()
    return fn(arrays), time.perf_counter() - t


def _local_keys(cfg: FedmedConfig) -> list[str]:
    """Keys the sites keep (``federation.bn: local``); an error when the model has no BatchNorm."""
    from fedmed.models import local_keys

    if cfg.federation.bn == "average":
        return []
    model = model_from_config(cfg, model_cfg=cfg.model.model_copy(update={"pretrained_path": None}))
    keys = local_keys(model, cfg.federation.bn)
    if not keys:
        raise UsageError("federation.bn: local keeps each site's BatchNorm, but the model has no trainable "
                         "BatchNorm (model.dp_compatible=true turns it into GroupNorm; frozen stages keep "
                         "theirs fixed): set model.dp_compatible=false, or federation.bn=average")
    return keys


def config_hash(cfg: FedmedConfig) -> str:
    """A stable fingerprint of the settings that change results (resume must match).

    ``calibration`` runs after the rounds and changes none of them, so it is left out: a
    finished federation can be resumed to (re)calibrate another way.
    """
    job = job_for_sites(cfg)
    job["federation"] = {k: v for k, v in cfg.federation.model_dump(mode="json").items()
                         if k not in ("rounds", "calibration", "early_stopping_rounds", "personalize",
                                      "cross_site", "central_overlap")}
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def round_lr(cfg: FedmedConfig, rnd: int) -> float:
    """Cosine schedule over rounds (the papers' cosine schedule, stretched over the federation),
    after ``train.warmup_epochs`` of linear warm-up counted in rounds (:mod:`fedmed.train.schedule`)."""
    from fedmed.train.schedule import lr_factor, warmup_rounds

    warmup = warmup_rounds(cfg.train.warmup_epochs, cfg.federation.local_epochs)
    if (cfg.train.scheduler != "cosine" or cfg.federation.rounds <= 1) and not warmup:
        return cfg.train.lr
    return cfg.train.lr * lr_factor(rnd - 1, total=cfg.federation.rounds, warmup=warmup,
                                    cosine=cfg.train.scheduler == "cosine")


def aggregate_site_metrics(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Weighted mean (by ``num-examples``) and worst site of every headline metric: ``fed_auc``, ... of
    the sites' test splits, ``fed_val_auc``, ... of their val splits (``val_`` metrics)."""
    out: dict[str, float] = {}
    for prefix in ("", "val_"):
        for key in HEADLINE:
            vals = [(m[prefix + key], m.get(prefix + "num-examples", 1)) for m in per_site.values()
                    if prefix + key in m]
            if not vals:
                continue
            w = sum(n for _, n in vals)
            out[f"fed_{prefix}{key}"] = float(sum(v * n for v, n in vals) / max(w, 1))
            worst = max if key in ("ece", "loss") else min
            out[f"fed_worst_{prefix}{key}"] = float(worst(v for v, _ in vals))
    return out



def _widen_replies(replies: list[Message], current: ArrayRecord) -> list[Message]:
    """Half-precision updates back to the global model's dtypes before screening/aggregation."""
    for msg in replies:
        arrays = None if msg.has_error() else msg.content.get("arrays")
        if isinstance(arrays, ArrayRecord):  # any other kind of record is rejected by the screening
            msg.content["arrays"] = widen(arrays, current)
    return replies


def _wait_for_sites(grid: GridLike, minimum: int, timeout: float) -> int:
    """Block until ``minimum`` sites are connected; a clear error after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= minimum:
            return n
        if n != last:
            log.info("waiting for sites: %d connected, %d needed", n, minimum)
            last = n
        if time.monotonic() > deadline:
            raise RunTimeout(f"only {n} of the {minimum} required sites connected within {timeout:.0f}s")
        time.sleep(0.5)


def _evaluate_sites(replies: list[Message]) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    return screen_metric_replies(replies)


def _secure_query(grid: GridLike, nodes: list[int], base: dict[str, Any], stage: str, fed: Any,
                  extra: Callable[[int], dict[str, Any]] | None = None) -> tuple[dict[int, Any], list[Rejected]]:
    """One secure-aggregation step at ``nodes``: their ``secagg`` records, and who failed why."""
    msgs = [Message(content=RecordDict({CONFIG_KEY: ConfigRecord({**base, "secagg-stage": stage,
                                                                  **(extra(n) if extra else {})})}),
                    message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    got: dict[int, Any] = {}
    failed: list[Rejected] = []
    for msg in send_and_receive(grid, msgs, timeout=fed.round_timeout):
        src = int(msg.metadata.src_node_id)
        rec = None if msg.has_error() else msg.content.get(SECAGG_KEY)
        why = (failure_text(msg) if msg.has_error() else "no secagg record" if rec is None
               else check_reply_record(rec) or ("wrong step" if rec["stage"] != stage or src not in nodes else None))
        if why is None and rec is not None:
            got[src] = {**dict(rec), "site": reply_site(msg)}
        else:
            failed.append(Rejected(reply_site(msg), f"secure aggregation ({stage}): {why}"))
    return got, failed


def _secure_round(grid: GridLike, rnd: int, current: ArrayRecord, config: ConfigRecord,
                  fed: Any) -> tuple[list[Message], list[Rejected], ArrayRecord | None, MetricRecord | None]:
    """One FedAvg round in which the server only ever holds the masked sum (fedmed.secagg).

    Keys (signed by each site, verified by its peers), encrypted shares, masked updates,
    signed survivor list, then the shares that remove the masks. A site that drops before
    uploading is recovered from its shares; one that drops after it, or too few sites, skips
    the round (the global model is kept).
    """
    base: dict[str, Any] = {"server-round": rnd, "federation-id": str(config["federation-id"])}

    def skipped(why: str, rej: list[Rejected]) -> tuple[list[Message], list[Rejected], None, None]:
        log.warning("round %d: secure aggregation: %s; the round is skipped", rnd, why)
        return [], rej + [Rejected("*", f"secure aggregation: {why}; round skipped")], None, None

    shared_config: dict[str, Any] = {**dict(config), **base}  # every site trains on the same model and settings
    plan = plan_hash({k: a.numpy() for k, a in current.items()}, shared_config)
    adverts, rejected = _secure_query(grid, sorted(grid.get_node_ids()), base, "keys", fed,
                                      lambda n: {"secagg-plan": plan})
    if len(adverts) < fed.min_sites:
        return skipped(f"only {len(adverts)} sites sent keys", rejected)
    nodes = sorted(adverts)
    # The names travel as the sites gave them; each peer checks name, node and keys against
    # the public key it holds for that name, so the server cannot vouch for anything here.
    roster = {"secagg-nodes": nodes, "secagg-enc-keys": [adverts[n]["enc-key"] for n in nodes],
              "secagg-mask-keys": [adverts[n]["mask-key"] for n in nodes],
              "secagg-signatures": [adverts[n]["signature"] for n in nodes],
              "secagg-sites": [adverts[n]["site"] for n in nodes]}
    shared, failed = _secure_query(grid, nodes, base, "share", fed, lambda n: roster)
    rejected += failed
    u2 = sorted(shared)
    if len(u2) < fed.min_sites:
        return skipped(f"only {len(u2)} sites accepted the keys", rejected)
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in u2}
    for src in u2:
        for dst, blob in zip(shared[src]["to"], shared[src]["ciphertexts"], strict=False):
            if int(dst) in inbox:
                inbox[int(dst)][src] = blob
    msgs = [Message(content=RecordDict({"arrays": current, CONFIG_KEY: ConfigRecord({
        **shared_config, "secagg-stage": "train", "secagg-u2": u2, "secagg-from": list(inbox[n]),
        "secagg-ciphertexts": list(inbox[n].values())})}), message_type=MessageType.TRAIN, dst_node_id=n)
        for n in u2]
    ok, failed = screen_train_replies(send_and_receive(grid, msgs, timeout=fed.round_timeout), current)
    rejected += failed
    ok = [m for m in ok if int(m.metadata.src_node_id) in inbox]
    u3 = sorted(int(m.metadata.src_node_id) for m in ok)
    if len(u3) < fed.min_sites:
        return skipped(f"only {len(u3)} masked updates arrived", rejected)
    if len(u3) < len(u2):
        log.info("round %d: %d of %d sites uploaded; removing the masks of the others from their shares",
                 rnd, len(u3), len(u2))
    sigs, failed = _secure_query(grid, u3, base, "survivors", fed, lambda n: {"secagg-survivors": u3})
    rejected += failed
    if sorted(sigs) != u3:
        return skipped("a site left before unmasking", rejected)
    revealed, failed = _secure_query(grid, u3, base, "unmask", fed, lambda n: {
        "secagg-signers": u3, "secagg-signatures": [sigs[v]["signature"] for v in u3]})
    rejected += failed
    b_shares: dict[int, list[bytes]] = {u: [] for u in u3}
    sk_shares: dict[int, list[bytes]] = {u: [] for u in set(u2) - set(u3)}
    for rec in revealed.values():
        for u, sh in zip(rec["b-of"], rec["b-shares"], strict=False):
            b_shares.get(int(u), []).append(sh)
        for u, sh in zip(rec["sk-of"], rec["sk-shares"], strict=False):
            sk_shares.get(int(u), []).append(sh)
    # screen_train_replies kept only replies with ArrayRecord arrays and a numeric num-examples
    arrays = [record_of(m, "arrays", ArrayRecord) for m in ok]
    scores = [record_of(m, "metrics", MetricRecord) for m in ok]
    weights = [number(s["num-examples"]) for s in scores]
    try:
        summed = unmask_sum(
            {int(m.metadata.src_node_id): {k: a.numpy() for k, a in rec.items()}
             for m, rec in zip(ok, arrays, strict=True)},
            self_masks={u: rebuild_secret(sh, n=len(nodes)) for u, sh in b_shares.items()},
            dropped_keys={u: rebuild_secret(sh, n=len(nodes)) for u, sh in sk_shares.items()},
            mask_keys={n: adverts[n]["mask-key"] for n in nodes}, federation=base["federation-id"], round_id=rnd,
            total_weight=sum(weights), dtypes={k: a.numpy().dtype for k, a in current.items()})
    except ValueError as exc:
        return skipped(f"masks could not be removed ({exc})", rejected)
    metrics = MetricRecord({k: float(sum((w * number(s[k]) for w, s in zip(weights, scores, strict=True)), 0.0)
                                     / sum(weights))
                            for k in scores[0].keys()
                            if k != "num-examples" and isinstance(scores[0][k], (int, float))})
    return ok, rejected, ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in summed.items()}), metrics


def run_federation(
    grid: GridLike,
    cfg: FedmedConfig,
    *,
    out_dir: Path,
    resume: bool = False,
    central_eval: Callable[[dict[str, np.ndarray]], dict[str, dict[str, Any]]] | None = None,
    on_round: Callable[[dict[str, Any], FederationState], None] | None = None,
    stop_after: int | None = None,
    central_logits: CentralLogits | None = None,
    on_pushed: Callable[[int], None] | None = None,
) -> FederationState:
    """Run (or resume) ``cfg.federation.rounds`` rounds; returns the final state.

    ``central_eval(arrays)`` returns ``{"val": metrics, "test": metrics}`` on the
    server's held-out data; the best model is chosen by ``train.monitor`` on the central
    validation set (else on the sites' val splits, weighted; never a test split).
    ``stop_after`` ends the run early after that round (tests).
    Once every round is done (also on resuming a finished run) the best model is
    calibrated as ``federation.calibration`` says; ``central_logits(arrays, split)`` lets
    that use the held-out set too. ``on_pushed(round)`` runs once a round's training
    messages are out (the coordinator's own work can start while the sites train). Raises
    ``ValueError`` when calibration is "central" without ``central_logits``.
    """
    fed = cfg.federation
    if fed.calibration == "central" and central_logits is None:
        raise UsageError("federation.calibration: central fits on the server's held-out set, but the "
                         "federation has none (federation.central_test); use calibration: federated")
    out_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    if resume:
        state = load_state(out_dir)
        if state.config_hash != chash:
            raise UsageError("--resume: the configuration differs from the stopped federation's "
                             f"(checkpoint {state.config_hash}, now {chash}); resume needs the same config")
        log.info("resuming after round %d of %d", state.round, fed.rounds)
    else:
        seed_everything(cfg.train.seed)
        model = model_from_config(cfg)
        init = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        state = FederationState(arrays=init, strategy=make_strategy(fed), config_hash=chash)
    strategy = state.strategy
    local = _local_keys(cfg)
    job = encode_job(job_for_sites(cfg))
    meta = {"config": cfg.model_dump(mode="json")}

    first = fed.rounds + 1 if state.stopped_early else state.round + 1  # an early stop is final
    # With federation.central_overlap a round is scored centrally (and closed) right after the
    # next round's messages are out, while the sites train it; the last round, and every round
    # with early stopping (its decision must come first), is scored on a thread beside the
    # sites' evaluation.
    overlap = fed.central_overlap and fed.early_stopping_rounds == 0 and central_eval is not None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmed-central") if central_eval else None
    pending: _OpenRound | None = None
    # the sites' val NLL curves of the last round's model, sent with its evaluation: the
    # calibration of that same model then skips its own fit exchange (server/calibration.py)
    curves: tuple[int, dict[str, dict[str, Any]]] | None = None
    ask_curves = fed.calibration == "federated" and not cfg.model.multilabel
    shortest, expect = math.inf, None  # the shortest complete training exchange so far; when to pull fast

    def close(p: _OpenRound) -> None:
        """Merge a round's central scores into its row, then checkpoint, log and report it."""
        row = p.row
        t1 = time.perf_counter()
        scored: tuple[dict[str, dict[str, Any]], float] | None = None
        if p.overlapped and central_eval is not None:  # here the sites train the next round meanwhile
            scored = _timed(central_eval, p.arrays)
        elif p.central is not None:  # on its thread beside the sites' evaluation
            scored = p.central.result()
        if scored is not None:
            central, seconds = scored
            for split, metrics in central.items():
                row.update({f"central_{split}_{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float))})
                if "confusion_matrix" in metrics:
                    row[f"central_{split}_confusion_matrix"] = metrics["confusion_matrix"]
            if p.overlapped:  # it ran while the next round trained: no time on the rounds' path
                row["timing"]["central_eval"] = 0.0
                row["timing"]["central_eval_overlapped"] = seconds
            else:
                row["timing"]["central_eval"] = time.perf_counter() - t1
        else:
            row["timing"]["central_eval"] = 0.0
        if not p.overlapped:
            row["seconds"] = time.perf_counter() - p.t0
        metric, score = selection(row, cfg.train.monitor)
        rnd = row["round"]
        state.round = rnd
        state.history.append(row)
        save_model(out_dir / "last_model.pt", p.arrays, meta={**meta, "round": rnd})
        if score is not None and math.isfinite(score) and score > state.best_score:
            state.best_score, state.best_round = float(score), rnd
            save_model(out_dir / "best_model.pt", p.arrays, meta={**meta, "round": rnd, "score": score,
                                                                   "selected_by": metric})
        stop = _early_stop(fed.early_stopping_rounds, rnd, state, metric)
        if stop is not None:
            state.stopped_early = stop
            row["early_stop"] = (f"after round {rnd}: {stop['metric']} has not improved for {stop['patience']} "
                                 f"round(s) since round {stop['best_round']}")
            log.info("early stopping %s", row["early_stop"])
        save_state(out_dir, state)
        log.info("round %d/%d: %d sites trained, %d rejected, central val AUC %s, %.1fs", rnd,
                 fed.rounds, len(row["sites_trained"]), len(row["sites_rejected"]),
                 _fmt(row.get("central_val_auc")), row["seconds"])
        if on_round is not None:
            on_round(row, state)

    def close_pending() -> None:
        nonlocal pending
        if pending is not None:
            p, pending = pending, None
            close(p)

    try:
        for rnd in range(first, fed.rounds + 1):
            t0, started = time.perf_counter(), time.time()
            timing: dict[str, float] = {}  # where the round's wall time goes (benchmarks read it)
            connected = _wait_for_sites(grid, fed.min_sites, fed.round_timeout)
            timing["wait_sites"] = time.perf_counter() - t0
            current = pack(state.arrays)
            config = ConfigRecord({JOB_KEY: job, "lr": round_lr(cfg, rnd), "federation-id": chash,
                                   "half-updates": fed.update_precision == "fp16"})
            if fed.secure_aggregation:
                close_pending()
                if on_pushed is not None:
                    on_pushed(rnd)
                ok, rejected, agg, train_metrics = _secure_round(grid, rnd, current, config, fed)
            else:
                ids = push_messages(grid, strategy.configure_train(rnd, current, config, grid))
                if on_pushed is not None:
                    on_pushed(rnd)
                close_pending()  # the previous round's scores, while the sites train this one
                replies = _widen_replies(collect_replies(grid, ids, timeout=fed.round_timeout, expect=expect),
                                         current)
                ok, rejected = screen_train_replies(replies, current)
                # Replies in site order, not arrival order: the float sum of FedAvg depends on its
                # order, so a rerun (or the direct baseline) repeats the federation exactly.
                ok.sort(key=lambda m: (reply_site(m), int(m.metadata.src_node_id)))
                agg = train_metrics = None
                if len(ok) == len(ids):  # every site answered: this round's length predicts the next's
                    shortest = min(shortest, time.perf_counter() - t0 - timing["wait_sites"])
                    expect = EXPECT_SHARE * shortest
            timing["train"] = time.perf_counter() - t0 - timing["wait_sites"]
            t1 = time.perf_counter()
            row: dict[str, Any] = {"round": rnd, "sites_connected": connected,
                                   "sites_trained": [reply_site(m) for m in ok],
                                   "sites_rejected": {r.site: r.reason for r in rejected}}
            if ok:
                if not fed.secure_aggregation:
                    agg, train_metrics = strategy.aggregate_train(rnd, ok)
                if agg is not None:  # FedBN: the sites' own BatchNorm is never averaged into the global model
                    state.arrays = {**unpack(agg, state.arrays), **{k: state.arrays[k] for k in local}}
                if train_metrics is not None:
                    row.update({f"train_{k}": float(v) for k, v in train_metrics.items()
                                if isinstance(v, (int, float))})
                row["train_per_site"] = {reply_site(m): {k: v for k, v in m.content["metrics"].items()}
                                         for m in ok}
            else:
                log.warning("round %d: no usable update (%d rejected); the global model is unchanged",
                            rnd, len(rejected))
            timing["aggregate"] = time.perf_counter() - t1
            arrays = state.arrays  # this round's model: never changed in place, only replaced
            last = rnd == fed.rounds or (stop_after is not None and rnd >= stop_after)
            deferred = overlap and not last and not fed.secure_aggregation
            # a deferred round is scored once the next round's messages are out (not beside their
            # sending, which it would slow); else on a thread beside the sites' evaluation
            central = (pool.submit(_timed, central_eval, arrays) if pool is not None and central_eval
                       and not deferred else None)
            t1 = time.perf_counter()
            if fed.fraction_evaluate > 0 and (rnd % fed.evaluate_every == 0 or rnd == fed.rounds):
                ev_config: dict[str, Any] = {JOB_KEY: job}
                if ask_curves and rnd == fed.rounds:
                    ev_config["temperatures"] = temperature_grid().tolist()
                ev_msgs = strategy.configure_evaluate(rnd, pack(arrays), ConfigRecord(ev_config), grid)
                ev_replies = send_and_receive(grid, ev_msgs, timeout=fed.round_timeout, poll=FAST_POLL)  # ~1 s
                per_site, failed = _evaluate_sites(ev_replies)
                if "temperatures" in ev_config:  # kept for the calibration, out of the round's metrics
                    curves = (rnd, {site: {CURVE_KEY: m.pop(f"val_{CURVE_KEY}"),
                                           "num-examples": m.get("val_num-examples")}
                                    for site, m in per_site.items() if f"val_{CURVE_KEY}" in m})
                for site, m in row.get("train_per_site", {}).items():
                    if "epsilon" in m and site in per_site:
                        per_site[site]["epsilon"] = m["epsilon"]
                row["per_site"] = per_site
                row["sites_eval_failed"] = failed
                row.update(aggregate_site_metrics(per_site))
            timing["site_eval"] = time.perf_counter() - t1
            row["timing"] = timing
            row["clock"] = {"start": started}  # wall clock: the benchmarks place start-up and reporting by it
            row["seconds"] = time.perf_counter() - t0  # a deferred round: its time on the rounds' path
            pending = _OpenRound(row=row, arrays=arrays, central=central, t0=t0, overlapped=deferred)
            if not deferred:
                close_pending()
            if stop_after is not None and rnd >= stop_after or state.stopped_early:
                break
    finally:
        close_pending()  # a later round failed or was interrupted: the finished one is still saved
        if pool is not None:
            pool.shutdown(wait=True)
    finished = state.round >= fed.rounds or bool(state.stopped_early)
    if finished and fed.calibration != "off":
        state.calibration = _calibrate_best(grid, cfg, state, out_dir=out_dir, job=job,
                                            central_logits=central_logits, val_curves=curves)
        save_state(out_dir, state)
    if finished and fed.personalize.epochs > 0 and state.personalization is None:
        state.personalization = _personalize_best(grid, cfg, state, out_dir=out_dir, job=job, federation_id=chash)
        save_state(out_dir, state)
    if finished and fed.cross_site and state.cross_site is None:
        state.cross_site = _cross_site(grid, cfg, state, out_dir=out_dir, job=job, federation_id=chash)
        save_state(out_dir, state)
    return state


def _cross_site(grid: GridLike, cfg: FedmedConfig, state: FederationState, *, out_dir: Path, job: str,
                federation_id: str) -> dict[str, Any]:
    """``federation.cross_site`` from the run's own initial weights; never raises."""
    from fedmed.server.crosssite import cross_site_validation

    seed_everything(cfg.train.seed)  # the same start as round 1 (run_federation builds it this way)
    init = {k: v.detach().cpu().numpy() for k, v in model_from_config(cfg).state_dict().items()}
    final = final_arrays(out_dir, state)
    try:
        return cross_site_validation(lambda msgs: send_and_receive(grid, msgs, timeout=cfg.federation.round_timeout),
                                     sorted(grid.get_node_ids()), cfg=cfg, init=init, final=final, job=job,
                                     federation_id=federation_id, out_dir=out_dir)
    except Exception as exc:  # noqa: BLE001 - the rounds are done and saved; report them anyway
        log.exception("cross-site validation failed on the server")
        return {"error": f"failed on the server ({type(exc).__name__}); see its log"}


def _personalize_best(grid: GridLike, cfg: FedmedConfig, state: FederationState, *, out_dir: Path, job: str,
                      federation_id: str) -> dict[str, Any]:
    """``federation.personalize`` on the best model (else the last); never raises."""
    from fedmed.server.personalize import personalize_sites

    path = final_model(out_dir)
    arrays = final_arrays(out_dir, state)
    try:
        result = personalize_sites(lambda msgs: send_and_receive(grid, msgs, timeout=cfg.federation.round_timeout),
                                   sorted(grid.get_node_ids()), cfg=cfg, arrays=arrays, job=job,
                                   federation_id=federation_id)
    except Exception as exc:  # noqa: BLE001 - the rounds are done and saved; report them anyway
        log.exception("personalisation failed on the server")
        result = {"error": f"failed on the server ({type(exc).__name__}); see its log"}
    result["model"] = path.name if path is not None else "final weights"
    return result


def _early_stop(patience: int, rnd: int, state: FederationState, metric: str) -> dict[str, Any] | None:
    """Whether ``federation.early_stopping_rounds`` ends the run after round ``rnd``."""
    if patience <= 0 or state.best_round <= 0 or rnd - state.best_round < patience:
        return None
    return {"round": rnd, "best_round": state.best_round, "best_score": state.best_score,
            "patience": patience, "metric": metric}


def _calibrate_best(grid: GridLike, cfg: FedmedConfig, state: FederationState, *, out_dir: Path,
                    job: str, central_logits: CentralLogits | None,
                    val_curves: tuple[int, dict[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Temperature scaling of ``best_model.pt`` (else ``last_model.pt``); ``T`` goes into its meta.

    ``val_curves`` (round, curves per site) are used when that round's model is the one calibrated.

    Never raises: failed sites are listed in the result, a server-side failure is logged and
    recorded as ``error``, so the finished rounds are still summarised and reported.
    """
    fed = cfg.federation
    if cfg.model.multilabel:
        reason = "multi-label model: temperature scaling here is for softmax outputs"
        log.info("calibration skipped: %s", reason)
        return {"method": fed.calibration, "skipped": reason}
    path = final_model(out_dir)
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if path is not None else {}
    arrays = ({k: v.numpy() for k, v in ckpt["model"].items()} if path is not None else state.arrays)
    try:
        _wait_for_sites(grid, fed.min_sites, fed.round_timeout)
    except TimeoutError as exc:
        log.warning("calibration goes on with the sites that are connected: %s", exc)
    try:
        result = calibrate_federation(
            lambda msgs: send_and_receive(grid, msgs, timeout=fed.round_timeout, poll=FAST_POLL),  # no training
            sorted(grid.get_node_ids()),
            method=fed.calibration, arrays=arrays, job=job, central_logits=central_logits,
            val_curves=(val_curves[1] if val_curves is not None
                        and val_curves[0] == int(ckpt.get("round", state.round)) else None))
    except Exception as exc:  # noqa: BLE001 - the rounds are done and saved; report them anyway
        log.exception("calibration failed on the server")
        result = {"method": fed.calibration, "error": f"failed on the server ({type(exc).__name__}); see its log"}
    result["model"] = path.name if path is not None else "final weights"
    result["round"] = int(ckpt.get("round", state.round))
    if "temperature" in result and path is not None:
        meta = {k: v for k, v in ckpt.items() if k != "model"}
        save_model(path, arrays, meta={**meta, "temperature": result["temperature"]})
    pooled, central = result.get("pooled", {}), result.get("central_test", {})
    log.info("calibration of %s (%s, T = %s): sites' test ECE %s -> %s, central test ECE %s -> %s; "
             "%d site(s) failed", result["model"], fed.calibration, _fmt(result.get("temperature")),
             _fmt(pooled.get("ece_before")), _fmt(pooled.get("ece_after")),
             _fmt(central.get("ece_before")), _fmt(central.get("ece_after")), len(result.get("sites_failed", {})))
    return result


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"
