"""The site's policy, enforced at the site: which messages it answers and which jobs it runs.

Everything the coordinator sends is untrusted input. Before any data is read, a job is held
against the site's own :class:`fedmed.config.SitePolicy` (its YAML): DP required or not, the
ε/δ/clipping caps, the smallest batch, notes, the id column, the message types, the length of
lists the server asks for. A job outside it is refused with a :class:`PublicRefusal` whose
text names only config keys and numbers, so the reason can be shown at both ends.
"""

from __future__ import annotations

import math
from typing import Any

from fedmed.config import FedmedConfig, SiteConfig
from fedmed.messages import PublicRefusal

__all__ = ["check_message", "check_job", "check_local_steps", "check_number_list", "check_number",
           "check_name", "local_steps"]

# Messages that train on the site's data: the policy's training limits apply to each of them
# (cross-site validation trains a local model that may leave; personalisation fine-tunes one).
TRAINING_TYPES = ("train", "evaluate.crosssite", "evaluate.personalize")

# Temperatures, learning rates and the like: finite and in a sane range.
_NUMBER_RANGE = (1e-3, 1e3)


def check_message(message_type: str, site: SiteConfig) -> None:
    """Refuse a message type the site's policy does not allow (before the handler runs)."""
    allowed = site.policy.allowed_messages
    if message_type not in allowed:
        raise PublicRefusal(f"message type {message_type} is not allowed by this site's policy "
                            f"(policy.allowed_messages: {', '.join(allowed)})")
    metric_types = ("evaluate", "evaluate.calibration", "evaluate.external", "evaluate.personalize",
                    "evaluate.crosssite")
    if message_type in metric_types and not site.policy.share_site_metrics:
        raise PublicRefusal(f"this site does not share its own evaluation metrics "
                            f"(policy.share_site_metrics: false); message type {message_type} refused")


def check_job(cfg: FedmedConfig, site: SiteConfig, *, message_type: str) -> None:
    """Refuse a job outside the site's policy; called before the site reads any data."""
    pol, problems = site.policy, []
    trains = message_type in TRAINING_TYPES
    if cfg.data.id_column != site.id_column:
        problems.append(f"data.id_column is {_key(cfg.data.id_column)} but this site's id column is "
                        f"{_key(site.id_column)}")
    used = {"data.label_column": [cfg.data.label_column], "data.numeric": cfg.data.numeric,
            "data.categorical": list(cfg.data.categorical),
            "data.notes_column": [cfg.data.notes_column] if cfg.data.notes_column else []}
    for key, cols in used.items():
        if site.id_column in cols:
            problems.append(f"{key} names the patient id column: ids are never a feature or a label")
    if cfg.model.notes.enabled and not pol.allow_notes:
        problems.append("model.notes.enabled: this site does not train on free-text notes "
                        "(policy.allow_notes: false)")
    for key, value in (("model.notes.encoder_dir", cfg.model.notes.encoder_dir),
                       ("model.notes.tokenizer_dir", cfg.model.notes.tokenizer_dir)):
        if value:
            problems.append(f"{key} names a path: a site opens only files its own config names")
    if trains and cfg.train.batch_size < pol.min_batch_size:
        problems.append(f"train.batch_size={cfg.train.batch_size} is below this site's minimum "
                        f"{pol.min_batch_size} (policy.min_batch_size)")
    p = cfg.privacy
    if trains and pol.require_dp and not p.enabled:
        problems.append("privacy.enabled=false but this site requires DP-SGD (policy.require_dp)")
    if trains and p.enabled:
        if pol.max_epsilon is not None and p.target_epsilon > pol.max_epsilon and pol.budget == "refuse":
            problems.append(f"privacy.target_epsilon={p.target_epsilon:g} exceeds this site's cap "
                            f"{pol.max_epsilon:g} (policy.max_epsilon)")
        if pol.max_delta is not None and p.target_delta > pol.max_delta:
            problems.append(f"privacy.target_delta={p.target_delta:g} exceeds this site's cap "
                            f"{pol.max_delta:g} (policy.max_delta)")
        if pol.max_grad_norm is not None and p.max_grad_norm > pol.max_grad_norm:
            problems.append(f"privacy.max_grad_norm={p.max_grad_norm:g} exceeds this site's cap "
                            f"{pol.max_grad_norm:g} (policy.max_grad_norm)")
    if trains and pol.max_local_steps is not None and cfg.train.max_steps_per_epoch is not None:
        steps = cfg.federation.local_epochs * cfg.train.max_steps_per_epoch
        if steps > pol.max_local_steps:
            problems.append(f"federation.local_epochs * train.max_steps_per_epoch = {steps} steps exceeds "
                            f"this site's cap {pol.max_local_steps} (policy.max_local_steps)")
    if problems:
        raise PublicRefusal("this site's policy refuses the job: " + "; ".join(problems))


def local_steps(cfg: FedmedConfig, n_train: int) -> int:
    """Optimiser steps one round takes at a site with ``n_train`` training samples."""
    per_epoch = max(1, math.ceil(n_train / cfg.train.batch_size))
    if cfg.train.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, cfg.train.max_steps_per_epoch)
    return cfg.federation.local_epochs * per_epoch


def check_local_steps(cfg: FedmedConfig, site: SiteConfig, *, n_train: int) -> None:
    """Refuse a round longer than the site's cap (needs only the size of the training split)."""
    cap = site.policy.max_local_steps
    steps = local_steps(cfg, n_train)
    if cap is not None and steps > cap:
        raise PublicRefusal(f"this site's policy refuses the job: a round of federation.local_epochs="
                            f"{cfg.federation.local_epochs} is {steps} optimiser steps here, above the cap "
                            f"{cap} (policy.max_local_steps)")


def check_number_list(name: str, values: Any, site: SiteConfig) -> list[float]:
    """A list of numbers the server sent (e.g. calibration temperatures), within the policy."""
    if not isinstance(values, (list, tuple)):
        raise PublicRefusal(f"{name} must be a list of numbers")
    cap = site.policy.max_metric_list
    if len(values) > cap:
        raise PublicRefusal(f"{name} has {len(values)} values; this site answers at most {cap} "
                            "(policy.max_metric_list)")
    return [check_number(name, v) for v in values]


def check_number(name: str, value: Any, *, lo: float = _NUMBER_RANGE[0], hi: float = _NUMBER_RANGE[1]) -> float:
    """One number from the server, finite and within ``[lo, hi]``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PublicRefusal(f"{name} is not a number") from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise PublicRefusal(f"{name} must be a finite number in [{lo:g}, {hi:g}]")
    return x


def check_name(name: str, value: Any) -> str:
    """A name from the server that the site uses in a file name (the federation id): no paths."""
    text = str(value)
    if not (0 < len(text) <= 64 and all(ch.isalnum() or ch in "_-." for ch in text) and ".." not in text
            and not text.startswith(".")):
        raise PublicRefusal(f"{name} must be 1-64 letters, digits, '_', '-' or '.' (no path)")
    return text


def _key(name: str) -> str:
    """A column name as the refusal may show it (config text; shortened, safe characters only)."""
    clean = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(name))[:40]
    return f"'{clean}'"
