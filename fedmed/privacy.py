"""Sample-level differential privacy at a site: one call that wraps Opacus.

Noise is calibrated once from the federation's target (ε, δ) over *all* planned rounds ×
local epochs with Poisson sampling, and the site's accountant is saved after every round
(:class:`PrivacyLedger`), so ε is cumulative over the whole federation and survives
restarts. The site's own caps decide: a plan above its cap is refused, and a site whose
budget is spent stops and says so.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from fedmed.config import PrivacyConfig, SiteConfig
from fedmed.data.dataset import dataset_size
from fedmed.dp_conv import skip_batch_param_grads, use_fast_conv2d
from fedmed.errors import UsageError
from fedmed.messages import PublicRefusal

__all__ = [
    "DP_CHANNELS_LAST",
    "BudgetError",
    "DPPlan",
    "plan_dp",
    "check_caps",
    "PrivacyLedger",
    "total_epsilon",
    "make_private",
]


#: DP-SGD trains in NCHW even where plain training uses channels_last (``train.channels_last``):
#: on CPU the DP step of the fusion model measured ~10 % faster in NCHW (Opacus' per-sample
#: bookkeeping and :mod:`fedmed.dp_conv`'s grouped weight-gradient kernel prefer NCHW maps),
#: while the plain step is ~10 % faster in NHWC. Not measured on a GPU.
DP_CHANNELS_LAST = False


class BudgetError(PublicRefusal):
    """The site refuses (plan above its cap) or has spent its privacy budget.

    Its text is built from ε/δ numbers and config keys only, so the coordinator may see it.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text, kind="budget")


@dataclass(frozen=True)
class DPPlan:
    """The noise a site adds, fixed for the whole federation."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str


def plan_dp(*, privacy: PrivacyConfig, n_train: int, batch_size: int, rounds: int,
            local_epochs: int) -> DPPlan:
    """Noise multiplier reaching ``privacy.target_epsilon`` after all planned rounds."""
    if n_train <= 0:
        raise UsageError("DP needs a non-empty training split")
    # q = 1/k exactly, so that Opacus' own sample rate (1 / len(loader)) is the planned one.
    per_epoch = max(1, round(n_train / batch_size))
    q = 1.0 / per_epoch
    steps = per_epoch * local_epochs
    sigma = get_noise_multiplier(target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
                                 sample_rate=q, steps=steps * rounds, accountant=privacy.accountant)
    return DPPlan(noise_multiplier=float(sigma), sample_rate=q, steps_per_round=steps, rounds=rounds,
                  target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
                  max_grad_norm=privacy.max_grad_norm, accountant=privacy.accountant)


def check_caps(privacy: PrivacyConfig, site: SiteConfig) -> None:
    """Refuse a job whose privacy settings exceed what this site's policy allows."""
    problems, pol = [], site.policy
    if pol.max_epsilon is not None and privacy.target_epsilon > pol.max_epsilon and pol.budget == "refuse":
        problems.append(f"target ε={privacy.target_epsilon:g} exceeds this site's cap ε≤{pol.max_epsilon:g}")
    if pol.max_delta is not None and privacy.target_delta > pol.max_delta:
        problems.append(f"δ={privacy.target_delta:g} exceeds this site's cap δ≤{pol.max_delta:g}")
    if pol.max_grad_norm is not None and privacy.max_grad_norm > pol.max_grad_norm:
        problems.append(f"clipping norm {privacy.max_grad_norm:g} exceeds this site's cap {pol.max_grad_norm:g}")
    if problems:
        raise BudgetError(f"site {site.site} refuses the privacy plan: " + "; ".join(problems))


class PrivacyLedger:
    """The site's accountant history for one federation, kept on the site's disk."""

    def __init__(self, path: Path, *, accountant: str) -> None:
        self.path = path
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = []
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("accountant") != accountant:
                raise BudgetError(f"the site's privacy ledger for this federation was kept with accountant "
                                  f"{str(data.get('accountant'))[:8]}, the job asks for {accountant}")
            self.history = [tuple(h) for h in data["history"]]

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """ε spent so far (plus an ``extra`` (σ, q, steps) not yet taken)."""
        hist = self.history + ([extra] if extra else [])
        if not hist:
            return 0.0
        engine = PrivacyEngine(accountant=self.accountant)
        engine.accountant.history = list(hist)
        return float(engine.accountant.get_epsilon(delta))

    def record(self, history: list[tuple[float, float, int]]) -> None:
        """Save the accountant's history atomically after a round."""
        self.history = [(sigma, q, steps) for sigma, q, steps in history]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"accountant": self.accountant, "history": self.history}))
        os.replace(tmp, self.path)


def total_epsilon(folder: Path, *, delta: float, exclude: Path | None = None) -> float:
    """ε spent over every federation ledger in ``folder`` (sequential composition: they add)."""
    total = 0.0
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        data = json.loads(path.read_text())
        total += PrivacyLedger(path, accountant=str(data.get("accountant", "rdp"))).epsilon(delta)
    return total


def _collate_with_empty(batch: list[dict[str, torch.Tensor]], template: dict[str, torch.Tensor]):
    """Poisson sampling can draw an empty batch: return empty tensors of the right shape."""
    if batch:
        return default_collate(batch)
    return {k: torch.zeros((0, *v.shape), dtype=v.dtype) for k, v in template.items()}


def poisson_loader(dataset: Dataset, *, sample_rate: float, generator: torch.Generator | None = None) -> DataLoader:
    """Each sample joins each step independently with probability ``sample_rate`` (DP-SGD)."""
    template = {k: torch.as_tensor(v) for k, v in dataset[0].items()}
    sampler = UniformWithReplacementSampler(num_samples=dataset_size(dataset), sample_rate=sample_rate,
                                            generator=generator)
    return DataLoader(dataset, batch_sampler=sampler,
                      collate_fn=functools.partial(_collate_with_empty, template=template))


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    *,
    plan: DPPlan,
    ledger: PrivacyLedger,
    generator: torch.Generator | None = None,
    fast_conv: bool = True,
) -> tuple[GradSampleModule, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """Wrap model, optimizer and a Poisson loader for DP-SGD; the accountant resumes the ledger.

    ``fast_conv`` routes ``nn.Conv2d`` and ``nn.GroupNorm`` per-sample gradients through
    :mod:`fedmed.dp_conv` (the same values as Opacus' samplers, faster: the CNN's per-sample
    gradients were most of DP's extra step time) and lets the model's convolutions skip the
    batch weight gradients the DP optimizer replaces anyway
    (:func:`fedmed.dp_conv.skip_batch_param_grads`); False uses Opacus' samplers alone. The
    sampler choice is process-wide (Opacus keeps one grad sampler per layer type).

    Raises :class:`ValueError` when the model has layers Opacus cannot handle (build it with
    ``model.dp_compatible=true``).
    """
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    # Opacus matches exact types, so timm's BatchNormAct2d (a BatchNorm2d subclass) passes its
    # validator, yet in training it mixes the samples of a batch: refuse every live BatchNorm.
    errors += [f"BatchNorm at {n or 'model'} mixes samples within a batch" for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if errors:
        raise UsageError(f"model is not DP-compatible ({errors[0]}); set model.dp_compatible=true, or, to keep "
                         "a pretrained backbone's BatchNorm, freeze it: model.trainable_stages=0")
    use_fast_conv2d(fast_conv)
    engine = PrivacyEngine(accountant=plan.accountant)
    engine.accountant.history = list(ledger.history)
    loader = poisson_loader(dataset, sample_rate=plan.sample_rate, generator=generator)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, poisson_sampling=False)
    if fast_conv:
        skip_batch_param_grads(model)
    return model, optimizer, loader, engine
