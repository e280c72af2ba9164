"""Typed configuration loaded from YAML, with ``key=value`` overrides.

The YAML files in ``configs/`` are the single source of settings. Only the edges (CLIs,
Flower app handlers) call :func:`load_config`; everything below takes these typed objects.
Unknown keys, wrong types and out-of-range values are errors that name the key and file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmed.errors import FedmedError

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "NotesConfig",
    "TrainConfig",
    "FederationConfig",
    "PersonalizeConfig",
    "PrivacyConfig",
    "TrackingConfig",
    "SitePolicy",
    "SiteConfig",
    "FedmedConfig",
    "load_config",
    "load_site_config",
    "apply_overrides",
    "parse_overrides",
]


class ConfigError(FedmedError, ValueError):
    """A configuration file or override is invalid; the message names the key and file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where a site's data lives and how it becomes tensors."""

    root: str | None = Field(None, description="folder with one sub-folder per site")
    sites: list[str] | None = Field(None, description="site folders to use (default: all)")
    classes: list[str] = Field(..., min_length=2, description="label names, in output order")
    id_column: str = "patient_id"
    label_column: str = "label"
    notes_column: str | None = None
    numeric: list[str] = Field(default_factory=list)
    categorical: dict[str, list[str]] = Field(
        default_factory=dict, description="column -> allowed values (fixed vocabulary)"
    )
    ignore_columns: list[str] = Field(default_factory=list)
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"age": (0.0, 120.0)},
        description="numeric column -> (min, max) plausible values; a value outside is a data "
        "error naming the lines. Columns without a range must stay within +-1e9")
    image_size: int = Field(64, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    window: tuple[float, float] | None = Field(
        None, description="DICOM (center, width); default: the file's VOI LUT / full range"
    )
    clahe: bool = False
    denoise: bool = False
    color_constancy: bool = Field(
        False, description="shades-of-grey colour normalisation (RGB): removes each centre's tint"
    )
    multiframe: Literal["middle", "first", "refuse"] = Field(
        "middle", description="multi-frame DICOM (cine, tomosynthesis, multi-frame CT): train on "
        "the middle frame, the first, or refuse such files")
    augment: bool = True
    any_orientation: bool = Field(
        False, description="images have no up/down (dermoscopy, histology): augment with "
                           "vertical flips and quarter turns; leave off for X-ray, CT, MRI"
    )
    imputation: Literal["median", "knn"] = "median"
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    split_seed: int = 0
    split_column: str | None = Field(
        None, description="column in records (or images) naming each patient's side: train, val "
        "or test (a study's fixed split); without val rows, val is carved from the train "
        "patients by val_fraction")
    cache_dir: str | None = Field(None, description="decoded-image cache (default ~/.cache/fedmed)")
    image_roots: list[str] = Field(
        default_factory=list, description="folders outside a site folder that its images.csv may "
        "point into (local runs; in a federation only each site's own config decides)")
    num_workers: int = Field(0, ge=0, le=64)


class NotesConfig(_Strict):
    """Optional free-text notes encoder (a small `transformers` encoder, no downloads)."""

    enabled: bool = False
    encoder_dir: str | None = Field(None, description="local transformers model dir")
    tokenizer_dir: str | None = Field(None, description="local tokenizer dir (else trained)")
    vocab_size: int = Field(2000, ge=100, le=100_000)
    max_length: int = Field(48, ge=4, le=512)
    hidden_size: int = Field(64, ge=16, le=1024)
    layers: int = Field(1, ge=1, le=24)
    heads: int = Field(2, ge=1, le=32)


class ModelConfig(_Strict):
    """The fusion model (papers): image CNN + record Transformer + cross-attention fusion."""

    variant: Literal["fusion", "image", "record"] = "fusion"
    backbone: str = Field("small_cnn", description="fedmed-registered name or any timm name")
    pretrained_path: str | None = Field(None, description="local weights file for the backbone")
    image_mean: list[float] | None = Field(
        None, description="per-channel input mean, [0, 1] units (default: the backbone's)")
    image_std: list[float] | None = Field(
        None, description="per-channel input std, > 0 (default: the backbone's)")
    embed_dim: int = Field(64, ge=8, le=2048)
    record_layers: int = Field(2, ge=1, le=12)
    heads: int = Field(4, ge=1, le=32)
    fusion_heads: int = Field(4, ge=1, le=32)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    multilabel: bool = False
    dp_compatible: bool = Field(True, description="GroupNorm, no in-place ops (Opacus-ready)")
    trainable_stages: int | None = Field(
        None, ge=0, le=64, description="fine-tune only the backbone's last N stages (timm's coarse "
        "groups: stem, blocks…, head); the rest is frozen, its BatchNorm statistics fixed "
        "(FrozenBatchNorm). 0 = frozen backbone (DP with pretrained BatchNorm); null = train all")
    notes: NotesConfig = Field(default_factory=NotesConfig)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        for name in ("heads", "fusion_heads"):
            if self.embed_dim % getattr(self, name):
                raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by {name}")
        return self


class TrainConfig(_Strict):
    """Local training (one site, or a pooled set)."""

    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["adamw", "adam", "sgd"] = Field(
        "adamw", description="sgd (with momentum) suits DP-SGD: Adam rescales noise-only coordinates")
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (optimizer: sgd)")
    weight_decay: float = Field(1e-5, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "none"] = "cosine"
    patience: int = Field(5, ge=0, le=10_000, description="early stopping on the monitored validation metric; "
                          "0 = off")
    monitor: Literal["auc", "balanced_accuracy", "loss"] = Field(
        "auc", description="the validation metric that picks the best epoch (local and pooled runs) and the best "
        "round of a federation (central val, else the sites' val splits), and drives early stopping")
    loss: Literal["ce", "focal", "logit_adjusted"] = Field(
        "ce", description="logit_adjusted: cross-entropy on logits + tau·log(site's label prior), for balanced "
        "accuracy under label skew (class_weights does not apply to it)")
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)
    logit_adjust_tau: float = Field(1.0, gt=0.0, le=10.0, description="the adjustment's scale (loss: logit_adjusted)")
    class_weights: bool = Field(True, description="inverse-frequency class weights for ce and focal")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    amp: bool = True
    seed: int = 0
    backbone_lr_scale: float = Field(
        1.0, gt=0.0, le=10.0, description="the image backbone's learning rate = lr × this (e.g. 0.1 "
        "for a pretrained backbone under a fresh head)")
    warmup_epochs: int = Field(0, ge=0, le=1000, description="linear learning-rate warm-up (in a "
                               "federation: over the first rounds covering as many local epochs)")
    channels_last: bool = Field(True, description="NHWC memory format on CUDA and CPU (faster convolutions "
                                "there; ignored on MPS)")
    grad_clip: float | None = Field(None, gt=0.0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    progress: bool = True


class PersonalizeConfig(_Strict):
    """Local fine-tuning of the final global model at each site (after the last round)."""

    epochs: int = Field(0, ge=0, le=1000, description="fine-tuning epochs on each site's train split; 0 = off")
    layers: list[str] = Field(
        default_factory=lambda: ["head", "classifier"],
        description="parameter-name prefixes to fine-tune (the rest stay frozen); ['all'] = every layer")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="fine-tuning learning rate (default train.lr)")


class FederationConfig(_Strict):
    """Server-side federation settings."""

    rounds: int = Field(10, ge=1, le=100_000)
    strategy: str = "fedavg"
    min_sites: int = Field(2, ge=1)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    evaluate_every: int = Field(1, ge=1, description="federated evaluation every N rounds (and the last)")
    early_stopping_rounds: int = Field(
        0, ge=0, description="stop when the selection score (train.monitor on the central val set, else on the "
        "sites' val splits, weighted) has not improved for N rounds; the best round is kept; 0 = off")
    secure_aggregation: bool = Field(False, description="pairwise-masked sums: the server sees only the total")
    client_dp: Literal["off", "server-fixed", "server-adaptive"] = Field(
        "off", description="client-level DP with Flower's DP strategy wrappers (clipping + noise at the server)")
    client_dp_noise: float = Field(1.0, ge=0.0, description="noise multiplier for client-level DP")
    client_dp_clip: float = Field(1.0, gt=0.0, description="clipping norm (initial norm when adaptive)")
    local_epochs: int = Field(1, ge=1, le=1000)
    proximal_mu: float = Field(0.0, ge=0.0)
    bn: Literal["average", "local"] = Field(
        "average", description="BatchNorm weights and statistics: averaged like every weight, or "
        "kept at each site and never uploaded (FedBN, Li et al. 2021); needs BatchNorm in the model "
        "(model.dp_compatible=false)")
    server_lr: float = Field(0.01, gt=0.0)
    round_timeout: float = Field(600.0, gt=0.0)
    central_test: str | None = Field(None, description="site folder held out for central eval")
    central_overlap: bool = Field(
        True, description="score round N on central_test while round N+1 trains (same numbers, off the "
        "rounds' path); off with early_stopping_rounds, whose decision must come before the next round")
    update_precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="precision of the weights a site sends back (fp16 halves the upload)")
    strategy_args: dict[str, Any] = Field(default_factory=dict)
    personalize: PersonalizeConfig = Field(default_factory=PersonalizeConfig)
    cross_site: bool = Field(
        False, description="after the last round: each site trains a local model from the same start for "
        "the same budget; the global and every local model are scored at every site (a matrix)")
    calibration: Literal["federated", "central", "off"] = Field(
        "federated", description="temperature scaling of the best model after the last round, fitted "
        "on the sites' val splits (each sends an NLL curve), on central_test's val split, or off")

    @field_validator("calibration", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _central_calibration_needs_a_set(self) -> FederationConfig:
        if self.calibration == "central" and not self.central_test:
            raise ValueError("calibration: central fits the temperature on the server's held-out set; "
                             "set federation.central_test, or use calibration: federated")
        return self

    @model_validator(mode="after")
    def _cross_site_shows_single_sites(self) -> FederationConfig:
        if self.cross_site and (self.secure_aggregation or self.client_dp != "off"):
            raise ValueError("cross_site sends each site's own local model through the server, which "
                             "secure_aggregation / client_dp are there to prevent; choose one")
        return self

    @model_validator(mode="after")
    def _secure_needs_a_sum(self) -> FederationConfig:
        if self.secure_aggregation and self.client_dp != "off":
            raise ValueError("client_dp clips each update at the server, which secure_aggregation hides; "
                             "choose one")
        if self.secure_aggregation and self.update_precision != "fp32":
            raise ValueError("secure_aggregation masks fixed-point integers; use update_precision=fp32 with it")
        if self.secure_aggregation and self.strategy.lower() not in ("fedavg", "fedprox"):
            raise ValueError("secure_aggregation reveals only the sum of updates: use strategy fedavg or "
                             f"fedprox, not {self.strategy}")
        return self


class PrivacyConfig(_Strict):
    """Sample-level DP at the site (Opacus)."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0.0)
    target_delta: float = Field(1e-3, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<output>/mlflow.db")
    experiment: str = "fedmed"


class FedmedConfig(_Strict):
    """The whole job: data, model, training, federation, privacy, tracking."""

    name: str = "fedmed"
    output_dir: str = "runs"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


class SiteSecAggConfig(_Strict):
    """What a site trusts in secure aggregation: its own key and its peers', never the server's word."""

    signing_key: str | None = Field(None, description="this site's private key (fedmed site-key); "
                                    "default: fedmed-client --auth-key")
    peers_dir: str | None = Field(None, description="folder of the peer sites' <site>.pub keys, "
                                  "received from the sites themselves, not from the coordinator")
    min_sites: int = Field(2, ge=2, description="never mask or unmask in a sum of fewer sites")
    required: bool = Field(False, description="refuse to send a training update without secure aggregation")


# Message types a site may answer (Flower's "<category>[.<action>]").
# query.statistics (fedmed.stats): aggregates only, small cells suppressed below the site's
# stats_min_count — allowed by default, as federated-statistics tools do (FLARE's min_count).
MESSAGE_TYPES = ("train", "evaluate", "evaluate.calibration", "query", "query.statistics",
                 "evaluate.external", "evaluate.personalize", "evaluate.crosssite")
# evaluate.crosssite sends the site's own local model through the server: a site opts in.
DEFAULT_MESSAGES = tuple(t for t in MESSAGE_TYPES if t != "evaluate.crosssite")


class SitePolicy(_Strict):
    """What this hospital allows, whatever the coordinator asks (checked before any data is read).

    The coordinator's job is untrusted input: a job or message outside this policy is refused
    with the reason at both ends. Defaults are what a hospital's security officer would sign.
    """

    require_dp: bool = Field(False, description="refuse any training job without DP-SGD (privacy.enabled)")
    max_epsilon: float | None = Field(None, gt=0.0, description="cap on the federation's ε at this site")
    max_total_epsilon: float | None = Field(
        None, gt=0.0, description="cap on the ε of all federations this site trained in, added up "
        "(a coordinator cannot reset the budget by starting a new federation)")
    max_delta: float | None = Field(None, gt=0.0, lt=1.0)
    max_grad_norm: float | None = Field(None, gt=0.0, description="cap on DP-SGD's clipping norm")
    budget: Literal["refuse", "spend"] = Field(
        "refuse", description="refuse a DP plan above max_epsilon, or train until it is spent")
    min_batch_size: int = Field(16, ge=1, description="smallest local batch: no update from one patient's gradient")
    max_local_steps: int | None = Field(
        10_000, ge=1, description="cap on optimiser steps per round (local epochs × steps per epoch)")
    max_metric_list: int = Field(
        256, ge=1, le=100_000, description="longest list the server may ask for (e.g. calibration's temperatures)")
    allowed_messages: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MESSAGES),
        description=f"message types this site answers, of {list(MESSAGE_TYPES)} (default: all but "
                    "evaluate.crosssite)")
    # private by default: a relayed model passes through the coordinator, which a site cannot
    # check keeps nothing; a site opts in to relay or share.
    local_model: Literal["private", "relay", "share"] = Field(
        "private", description="cross-site validation: the site's locally trained model stays here (private: "
        "scored at home only), goes through the server to the other sites without being kept (relay), or "
        "may be kept by the server (share)")
    share_site_metrics: bool = Field(
        True, description="whether this site's own evaluation metrics may leave it (evaluate, calibration)")
    allow_notes: bool = Field(False, description="whether a job may train on the free-text notes column")
    stats_min_count: int = Field(
        5, ge=1, description="federated statistics: counts below this never leave the site (the "
        "server may ask for a larger k, never a smaller one)")

    @field_validator("allowed_messages")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in MESSAGE_TYPES]
        if unknown:
            raise ValueError(f"unknown message types {unknown}; valid: {list(MESSAGE_TYPES)}")
        return v


class SiteConfig(_Strict):
    """One hospital's own settings: its data, where its files may be, and its policy."""

    site: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    data_dir: str
    id_column: str = Field("patient_id", description="this site's patient id column: never a feature or label")
    image_roots: list[str] = Field(
        default_factory=list, description="folders outside data_dir that images.csv may point into")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    num_workers: int = Field(0, ge=0, le=64, description="data-loading workers (the site's choice, not the job's)")
    cache_dir: str | None = None
    state_dir: str | None = Field(None, description="site state (privacy ledger); default ~/.fedmed/sites/<site>")
    policy: SitePolicy = Field(default_factory=SitePolicy)
    secagg: SiteSecAggConfig = Field(default_factory=SiteSecAggConfig)

    def state_path(self) -> Path:
        """The site's state folder (privacy ledgers, personalised and local models)."""
        return Path(self.state_dir) if self.state_dir else Path.home() / ".fedmed" / "sites" / self.site

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = [k for k in ("max_epsilon", "max_delta", "max_grad_norm", "budget")
                 if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"{moved} moved into the site's `policy:` section (policy.{moved[0]}: ...)")
        return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``a.b=value`` strings; values are YAML (``3``, ``true``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught by validation."""
    out = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {dotted}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def _resolve_paths(raw: dict[str, Any], base: Path, keys: list[tuple[str, ...]]) -> None:
    """Make relative paths in the file relative to the file's folder, not the CWD."""
    for key in keys:
        node: Any = raw
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(key[-1]), str):
            p = Path(node[key[-1]]).expanduser()
            if not p.is_absolute() and not str(node[key[-1]]).startswith(("sqlite:", "http")):
                node[key[-1]] = str((base / p).resolve())


_PATH_KEYS = [("data", "root"), ("data", "cache_dir"), ("model", "pretrained_path"),
              ("federation", "central_test"), ("output_dir",),
              ("model", "notes", "encoder_dir"), ("model", "notes", "tokenizer_dir")]


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    raw: dict[str, Any] | None = None,
) -> FedmedConfig:
    """Load a :class:`FedmedConfig` from YAML (or a dict) plus ``key=value`` overrides.

    Relative paths inside the file resolve against the file's folder. Raises
    :class:`ConfigError` naming every bad key and the file.
    """
    source = str(path) if path is not None else "<dict>"
    data = _read_yaml(path) if path is not None else dict(raw or {})
    if path is not None:
        _resolve_paths(data, Path(path).resolve().parent, _PATH_KEYS)
    if path is not None and isinstance(data.get("data"), dict) and isinstance(data["data"].get("image_roots"), list):
        base = Path(path).resolve().parent
        data["data"]["image_roots"] = [str((base / Path(r).expanduser()).resolve())
                                       for r in data["data"]["image_roots"]]
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    data = apply_overrides(data, ov)
    if ov:
        source += " (with overrides " + ", ".join(ov) + ")"
    try:
        return FedmedConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_site_config(
    path: str | Path, overrides: list[str] | dict[str, Any] | None = None
) -> SiteConfig:
    """Load one hospital's :class:`SiteConfig`; relative ``data_dir`` is file-relative."""
    data = _read_yaml(path)
    base = Path(path).resolve().parent
    _resolve_paths(data, base, [("data_dir",), ("cache_dir",), ("state_dir",)])
    if isinstance(data.get("image_roots"), list):
        data["image_roots"] = [str((base / Path(r).expanduser()).resolve()) for r in data["image_roots"]]
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    data = apply_overrides(data, ov)
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from None
