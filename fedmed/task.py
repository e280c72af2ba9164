"""The one module of plain PyTorch that the CLI, the ClientApp and the ServerApp share.

It turns a typed config plus a site folder into loaders, a loss and a model; how the
weights travel between server and sites is :mod:`fedmed.transfer`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.config import DataConfig, FedmedConfig, ModelConfig
from fedmed.data.checks import check_trainable
from fedmed.data.dataset import SiteSplits, build_splits, class_counts
from fedmed.data.images import ImageCache, Preprocess
from fedmed.data.site import SiteData, combine_sites, load_site
from fedmed.errors import UsageError
from fedmed.models import FusionModel, build_model

__all__ = [
    "SiteBundle",
    "seed_everything",
    "site_dirs",
    "load_site_bundle",
    "make_loaders",
    "model_from_config",
    "notes_tokenizer",
    "training_loss",
]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def site_dirs(data: DataConfig) -> dict[str, Path]:
    """The site folders under ``data.root`` (all, or those in ``data.sites``), by name."""
    if not data.root:
        raise UsageError("data.root is not set: point it at a folder with one sub-folder per site")
    root = Path(data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist (import or synthesize data first)")
    found = {p.name: p for p in sorted(root.iterdir())
             if p.is_dir() and ((p / "records.csv").exists() or (p / "records.parquet").exists()
                                or (p / "images.csv").exists())}
    if data.sites:
        missing = [s for s in data.sites if s not in found]
        if missing:
            raise UsageError(f"sites {missing} not found under {root}; found: {sorted(found)}")
        return {s: found[s] for s in data.sites}
    if not found:
        raise UsageError(f"no site folders (with records.csv or images.csv) under {root}")
    return found


def notes_tokenizer(cfg: FedmedConfig, texts: list[str] | None = None):
    """The notes tokenizer: loaded from ``model.notes.tokenizer_dir``, else trained on ``texts``.

    Returns a callable ``list[str] -> dict(input_ids, attention_mask)`` or None when notes
    are off. A federation must share one tokenizer dir so token ids mean the same at all sites.
    """
    ncfg = cfg.model.notes
    if not ncfg.enabled:
        return None
    from fedmed.models.notes import load_tokenizer, make_tokenize_fn, train_tokenizer

    if ncfg.tokenizer_dir:
        tok = load_tokenizer(ncfg.tokenizer_dir)
    else:
        if not texts:
            raise UsageError("model.notes.enabled needs model.notes.tokenizer_dir or notes to train on")
        tok = train_tokenizer(texts, vocab_size=ncfg.vocab_size)
    return make_tokenize_fn(tok, ncfg.max_length)


@dataclass
class SiteBundle:
    """A site's (or the pool's) splits plus what the model needs to know about them."""

    name: str
    site: SiteData
    splits: SiteSplits
    n_classes: int
    #: how a pool's splits were made: ``"site-splits"`` = the union of each site's own splits
    #: (:func:`fedmed.experiments.compare.pooled_bundle`), None = split afresh (or one site)
    pool: str | None = None

    def class_counts(self) -> np.ndarray:
        return class_counts(self.splits.train, self.n_classes)


def load_site_bundle(
    cfg: FedmedConfig,
    *,
    sites: list[str] | None = None,
    site_dir: str | Path | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> SiteBundle:
    """Load, validate and split one site folder, or pool several sites by name."""
    data = cfg.data
    if site_dir is not None:
        site = load_site(site_dir, data)
        check_trainable(site, data)
    else:
        dirs = site_dirs(data)
        chosen = sites or list(dirs)
        unknown = [s for s in chosen if s not in dirs]
        if unknown:
            raise UsageError(f"unknown sites {unknown}; valid: {sorted(dirs)}")
        loaded = [load_site(dirs[s], data, name=s) for s in chosen]
        for one in loaded:  # a one-class or too-small site is refused, pooled or not
            check_trainable(one, data)
        site = loaded[0] if len(loaded) == 1 else combine_sites(loaded)
    cache = None
    if cfg.model.variant != "record" and site.samples["has_image"].any():
        cache = ImageCache(cache_dir or data.cache_dir, Preprocess.from_config(data))
    tokenizer = None
    if cfg.model.notes.enabled:
        texts = None
        if data.notes_column and data.notes_column in site.records:
            texts = site.records[data.notes_column].dropna().astype(str).tolist()
        tokenizer = notes_tokenizer(cfg, texts)
    splits = build_splits(site, data, cache=cache, tokenizer=tokenizer, progress=progress)
    return SiteBundle(name=site.name, site=site, splits=splits, n_classes=len(data.classes))


def make_loaders(
    splits: SiteSplits, *, batch_size: int, seed: int = 0, num_workers: int = 0
) -> dict[str, DataLoader]:
    """Train (shuffled, seeded) / val / test loaders over a site's splits."""
    gen = torch.Generator().manual_seed(seed)
    common: dict[str, Any] = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    return {
        "train": DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=gen,
                            drop_last=len(splits.train) > batch_size, **common),
        "val": DataLoader(splits.val, batch_size=batch_size * 2, **common),
        "test": DataLoader(splits.test, batch_size=batch_size * 2, **common),
    }


def model_from_config(cfg: FedmedConfig, *, model_cfg: ModelConfig | None = None) -> FusionModel:
    """Build the model from config alone, so every site and the server agree on its shape."""
    data = cfg.data
    mcfg = model_cfg or cfg.model
    vocab = None
    if mcfg.notes.enabled:
        vocab = mcfg.notes.vocab_size
        if mcfg.notes.tokenizer_dir:
            from fedmed.models.notes import load_tokenizer

            vocab = len(load_tokenizer(mcfg.notes.tokenizer_dir))
    return build_model(
        mcfg,
        n_classes=len(data.classes),
        in_chans=data.channels,
        n_numeric=len(data.numeric),
        cat_cardinalities=[len(v) for v in data.categorical.values()],
        notes_vocab_size=vocab,
    )


def training_loss(cfg: FedmedConfig, bundle: SiteBundle) -> nn.Module:
    """The loss named in ``cfg.train``, class-weighted by the bundle's training labels."""
    from fedmed.train.losses import make_loss

    return make_loss(kind=cfg.train.loss, n_classes=bundle.n_classes, class_counts=bundle.class_counts(),
                     use_class_weights=cfg.train.class_weights, focal_gamma=cfg.train.focal_gamma,
                     logit_adjust_tau=cfg.train.logit_adjust_tau, multilabel=cfg.model.multilabel)
