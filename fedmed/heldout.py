"""The held-out split a checkpoint was scored on, rebuilt for explaining or calibrating it.

A local model trained on several sites pooled must be explained on the pooled split's rows
of one site (a site split on its own would put training patients into its "test" split);
a federation's model, on each site's own split. ``fedmed explain`` and ``fedmed calibrate``
both read their data through :func:`site_split`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmed.config import FedmedConfig
from fedmed.errors import UsageError

__all__ = ["site_split", "trained_pooled"]


def trained_pooled(checkpoint: Path) -> bool:
    """True when ``metrics.json`` beside a local checkpoint says it was trained on a pool that
    was split afresh (``fedmed train-local --pooled``), so its held-out rows are the pooled split's.

    A pool made of each site's own splits (``fedmed compare``, ``simulations/pooled.py``:
    ``"pool": "site-splits"``) held out exactly each site's own test patients: False.
    """
    meta = checkpoint.parent / "metrics.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return info.get("site") == "pooled" and info.get("pool") != "site-splits"



def site_split(
    cfg: FedmedConfig,
    site_dir: str | Path | None,
    *,
    split: str | tuple[str, ...] = "test",
    pooled: bool = False,
    encoder_state: dict[str, Any] | None = None,
) -> Any:
    """A split of a site (or a dict of several), as the model was evaluated on it.

    ``pooled=False``: the site folder split on its own (what a federation and a one-site
    local run use). ``pooled=True``: the model was trained on the config's sites pooled, so
    the pooled split is rebuilt and only this site's samples are kept — otherwise training
    patients would leak into the "test" split. ``encoder_state`` (a local checkpoint's
    ``"encoder"``) replaces the encoder refitted here, so record features are scaled exactly
    as in training. ``site_dir=None`` → the whole pool of the config's sites (pooled split).
    ``split`` a tuple → ``{name: Dataset}`` from one load.
    """
    from fedmed.data.dataset import SiteDataset
    from fedmed.data.records import RecordEncoder
    from fedmed.task import load_site_bundle

    pooled = pooled or site_dir is None
    site_dir = Path(site_dir) if site_dir is not None else None
    if pooled:
        bundle = load_site_bundle(cfg, progress=False)
        sites = sorted(bundle.site.samples["site"].unique())
        if site_dir is not None and site_dir.name not in sites:
            raise UsageError(f"site {site_dir.name!r} is not one of the pooled sites {sites}")
    else:
        bundle = load_site_bundle(cfg, site_dir=site_dir, progress=False)
    encoder = None
    if encoder_state is not None and not cfg.model.notes.enabled:
        encoder = RecordEncoder(numeric=cfg.data.numeric, categorical=cfg.data.categorical,
                                imputation=cfg.data.imputation)
        encoder.load_state_dict(encoder_state)
    out: dict[str, Dataset] = {}
    for name in (split,) if isinstance(split, str) else split:
        rows = bundle.site.samples.iloc[bundle.splits.indices[name]]
        keep = (np.flatnonzero(rows["site"].to_numpy() == site_dir.name)
                if pooled and site_dir is not None else np.arange(len(rows)))
        base: SiteDataset = getattr(bundle.splits, name)
        if encoder is not None:
            out[name] = SiteDataset(rows.iloc[keep], bundle.site.records, encoder=encoder,
                                    spec=base.spec, cache=base.cache)
        else:
            out[name] = base if len(keep) == len(rows) else torch.utils.data.Subset(base, keep.tolist())
    return out[split] if isinstance(split, str) else out
