"""A site's runtime: which hospital this node is, its data, model, loaders and loss.

The site is named by the SuperNode's ``node_config``: ``site-config`` (path of the site's
YAML, real deployment) or ``partition-id`` mapped through the run config's ``sites`` list
(simulation). Loaded data is memoised per process, so a warm process (simulation) does not
read and split the site again every round.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from pydantic import ValidationError
from torch.utils.data import DataLoader

import fedmed
from fedmed.client.policy import check_job
from fedmed.config import FedmedConfig, SiteConfig, load_site_config
from fedmed.device import select_device
from fedmed.errors import UsageError
from fedmed.job import site_job_config
from fedmed.messages import PublicRefusal
from fedmed.task import load_site_bundle, make_loaders, model_from_config, seed_everything, training_loss
from fedmed.train.loop import Outputs, forward_pass

__all__ = ["SiteRuntime", "runtime_for", "resolve_site", "job_config"]

_CACHE: dict[str, SiteRuntime] = {}


@dataclass
class SiteRuntime:
    site: str
    cfg: FedmedConfig
    site_cfg: SiteConfig
    device: torch.device
    model: torch.nn.Module
    loaders: dict[str, DataLoader]
    loss_fn: torch.nn.Module
    n_classes: int
    # forward passes of the model state named by ``_scored_state`` (see ``outputs``)
    _scored: dict[str, Outputs] = field(default_factory=dict, repr=False)
    _scored_state: str = field(default="", repr=False)

    def outputs(self, *splits: str) -> list[Outputs]:
        """The model's labels, logits and loss on each of ``splits`` (val, test), computed once per
        split and set of weights: the last round's evaluation and the calibration that follows
        send the same weights, and the site then scores its data once, not three times."""
        state = _state_digest(self.model)
        if state != self._scored_state:
            self._scored, self._scored_state = {}, state
        for split in splits:
            if split not in self._scored:
                self._scored[split] = forward_pass(self.model, self.loaders[split], device=self.device,
                                                   amp=self.cfg.train.amp, loss_fn=self.loss_fn,
                                                   channels_last=self.cfg.train.channels_last)
        return [self._scored[split] for split in splits]

    def reseed(self, seed: int) -> None:
        """Reseed torch and the training loader's shuffling for this round."""
        seed_everything(seed)
        gen = self.loaders["train"].generator
        if gen is not None:
            gen.manual_seed(seed)


def _state_digest(model: torch.nn.Module) -> str:
    """A digest of every tensor of the model's state (weights and buffers, FedBN's local ones too)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def resolve_site(context: Context) -> SiteConfig:
    """This node's :class:`SiteConfig` from node_config (deployment) or run_config (simulation)."""
    node = context.node_config
    if "site-config" in node:
        return load_site_config(str(node["site-config"]))
    if "partition-id" in node:
        # `fedmed simulate` (run_simulation leaves run_config empty) passes them by environment.
        sites = [s for s in str(context.run_config.get("sites", "")
                                or os.environ.get("FEDMED_SIM_SITES", "")).split(",") if s]
        root = str(context.run_config.get("data-root", "") or os.environ.get("FEDMED_SIM_DATA_ROOT", ""))
        pid = int(node["partition-id"])
        if not sites or not root:
            raise UsageError("simulation run config needs 'sites' and 'data-root'")
        if pid >= len(sites):
            raise UsageError(f"partition-id {pid} but only {len(sites)} sites are configured")
        state = os.environ.get("FEDMED_SIM_STATE_DIR")
        # The simulating user is every site at once: its own data config (fedmed simulate
        # passes it by environment) is each simulated site's policy and image roots.
        extra = json.loads(os.environ.get("FEDMED_SIM_SITE_CONFIG", "") or "{}")
        keys = os.environ.get("FEDMED_SIM_SECAGG_KEYS")  # simulate's throw-away site keys
        if keys:
            extra["secagg"] = {"signing_key": str(Path(keys) / sites[pid]), "peers_dir": keys}
        return SiteConfig.model_validate({
            **extra, "site": sites[pid], "data_dir": str(Path(root) / sites[pid]),
            "device": str(context.run_config.get("device", "auto")),
            "state_dir": str(Path(state) / sites[pid]) if state else None})
    raise UsageError("this SuperNode has no node_config 'site-config' (start it with fedmed-client)")


def _check_version(job: dict[str, Any]) -> None:
    want = job.get("fedmed_version")
    if want != fedmed.__version__:
        raise PublicRefusal(
            f"the server runs fedmed {str(want)[:20]} but this site has fedmed {fedmed.__version__} installed; "
            "the site only runs the fedmed it has approved", kind="app-refused")


def job_config(job: dict[str, Any], site_cfg: SiteConfig, *, message_type: str) -> FedmedConfig:
    """The server's job as this site's config, held against its policy (no data is read)."""
    _check_version(job)
    try:
        cfg = site_job_config(job, site_cfg)
    except ValidationError as exc:
        keys = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})[:10]
        raise PublicRefusal(f"the job is not a valid fedmed configuration (keys: {', '.join(keys)})") from None
    check_job(cfg, site_cfg, message_type=message_type)
    return cfg


def runtime_for(job: dict[str, Any], context: Context, *, message_type: str = "train") -> SiteRuntime:
    """Build (or reuse) this site's runtime for the server's job.

    The job is held against the site's policy before any data is read
    (:func:`fedmed.client.policy.check_job`); a malformed or refused job raises
    :class:`PublicRefusal` naming only config keys and numbers.
    """
    site_cfg = resolve_site(context)
    cfg = job_config(job, site_cfg, message_type=message_type)
    key = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), site_cfg.model_dump(mode="json")],
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key in _CACHE:
        return _CACHE[key]
    bundle = load_site_bundle(cfg, site_dir=site_cfg.data_dir, progress=False)
    device = select_device(site_cfg.device)
    model = model_from_config(cfg).to(device)
    loaders = make_loaders(bundle.splits, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                           num_workers=cfg.data.num_workers)
    loss_fn = training_loss(cfg, bundle).to(device)
    rt = SiteRuntime(site=site_cfg.site, cfg=cfg, site_cfg=site_cfg, device=device, model=model,
                     loaders=loaders, loss_fn=loss_fn, n_classes=bundle.n_classes)
    _CACHE.clear()  # one job per process at a time; drop stale data
    _CACHE[key] = rt
    return rt
