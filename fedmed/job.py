"""The job contract: what the coordinator sends each site, and how a site rebuilds a config.

The server sends the settings that make every site build and train the same model — no
paths, no secrets. The site treats them as untrusted: it keeps only the sections it knows,
drops every key that names a file on its disk (only the site's own config may do that) and
fills in its own device, workers, cache, id column and image roots. Its policy
(:mod:`fedmed.client.policy`) then decides whether the job may run at all.
"""

from __future__ import annotations

from typing import Any

import fedmed
from fedmed.config import FedmedConfig, SiteConfig

__all__ = ["job_for_sites", "site_job_config", "JOB_SECTIONS", "JOB_FEDERATION_KEYS", "SITE_ONLY_DATA_KEYS"]

JOB_SECTIONS = ("name", "data", "model", "train", "privacy")
JOB_FEDERATION_KEYS = ("rounds", "local_epochs", "proximal_mu", "bn")
# Data keys a site sets itself: where its files are and how it reads them.
SITE_ONLY_DATA_KEYS = ("root", "sites", "cache_dir", "image_roots", "num_workers")


def job_for_sites(cfg: FedmedConfig) -> dict[str, Any]:
    """What each site needs to build the same model and train it: no paths, no secrets."""
    d = cfg.model_dump(mode="json")
    data = {k: v for k, v in d["data"].items() if k not in SITE_ONLY_DATA_KEYS}
    model = {k: v for k, v in d["model"].items() if k != "pretrained_path"}  # weights travel in the model
    return {"fedmed_version": fedmed.__version__, "name": cfg.name, "data": data, "model": model,
            "train": d["train"], "federation": {k: d["federation"][k] for k in JOB_FEDERATION_KEYS},
            "privacy": d["privacy"]}


def site_job_config(job: dict[str, Any], site: SiteConfig) -> FedmedConfig:
    """The config a site trains with: the job's settings, the site's own paths and resources.

    Raises ``pydantic.ValidationError`` for a malformed job (unknown keys, bad values).
    """
    raw: dict[str, Any] = {k: job[k] for k in JOB_SECTIONS if k in job}
    data = {k: v for k, v in dict(raw.get("data") or {}).items() if k not in SITE_ONLY_DATA_KEYS}
    data.update(num_workers=site.num_workers, image_roots=list(site.image_roots))
    if site.cache_dir:
        data["cache_dir"] = site.cache_dir
    raw["data"] = data
    model = dict(raw.get("model") or {})
    model.pop("pretrained_path", None)  # the first global model carries the weights
    raw["model"] = model
    raw["train"] = {**dict(raw.get("train") or {}), "device": site.device, "progress": False}
    fed = dict(job.get("federation") or {})
    raw["federation"] = {k: fed[k] for k in JOB_FEDERATION_KEYS if k in fed}
    return FedmedConfig.model_validate(raw)
