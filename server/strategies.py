"""Aggregation strategies by name: Flower's own Message-API strategies, configured from YAML."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp import strategy as fl

from fedmed.config import FederationConfig
from fedmed.errors import UsageError

__all__ = ["STRATEGIES", "make_strategy", "list_strategies"]


def _common(cfg: FederationConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_sites,
        "min_evaluate_nodes": cfg.min_sites if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_sites,
    }


def _fedopt(cls: type) -> Callable[[FederationConfig], fl.Strategy]:
    # eta is the server learning rate; eta_l is only logged by Flower (sites use train.lr).
    return lambda cfg: cls(**_common(cfg), eta=cfg.server_lr, **cfg.strategy_args)


STRATEGIES: dict[str, Callable[[FederationConfig], fl.Strategy]] = {
    "fedavg": lambda cfg: fl.FedAvg(**_common(cfg), **cfg.strategy_args),
    # FedProx puts proximal-mu into every train message; the site adds the proximal term.
    "fedprox": lambda cfg: fl.FedProx(**_common(cfg), proximal_mu=cfg.proximal_mu, **cfg.strategy_args),
    "fedadam": _fedopt(fl.FedAdam),
    "fedyogi": _fedopt(fl.FedYogi),
    "fedadagrad": _fedopt(fl.FedAdagrad),
    "fedavgm": lambda cfg: fl.FedAvgM(**_common(cfg), server_learning_rate=cfg.strategy_args.get(
        "server_learning_rate", 1.0), server_momentum=cfg.strategy_args.get("server_momentum", 0.9)),
    "fedmedian": lambda cfg: fl.FedMedian(**_common(cfg), **cfg.strategy_args),
    "fedtrimmedavg": lambda cfg: fl.FedTrimmedAvg(**_common(cfg), **{"beta": 0.2, **cfg.strategy_args}),
    "krum": lambda cfg: fl.Krum(**_common(cfg), **{"num_malicious_nodes": 0, **cfg.strategy_args}),
}


def list_strategies() -> list[str]:
    return sorted(STRATEGIES)


def make_strategy(cfg: FederationConfig) -> fl.Strategy:
    """Build the strategy named in ``federation.strategy``; the error lists valid names."""
    name = cfg.strategy.lower()
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {cfg.strategy!r}; valid: {', '.join(list_strategies())}")
    if name == "fedprox" and cfg.proximal_mu <= 0:
        raise UsageError("strategy fedprox needs federation.proximal_mu > 0 (e.g. 0.01)")
    try:
        strategy = STRATEGIES[name](cfg)
    except TypeError as exc:
        raise UsageError(f"federation.strategy_args do not fit {name}: {exc}") from None
    # Client-level DP: Flower's wrappers clip every site's update and add Gaussian noise to
    # the aggregate; num_sampled_clients is the sites per round (all connected, >= min_sites).
    if cfg.client_dp == "server-fixed":
        strategy = fl.DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=cfg.client_dp_noise, clipping_norm=cfg.client_dp_clip,
            num_sampled_clients=cfg.min_sites)
    elif cfg.client_dp == "server-adaptive":
        strategy = fl.DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise_multiplier=cfg.client_dp_noise, num_sampled_clients=cfg.min_sites,
            initial_clipping_norm=cfg.client_dp_clip)
    return strategy
