"""DP cost at the sites' real batch sizes, and where the DP step's time goes (issue 18).

Two models, each built from its config (the settings a site trains with):

* the small CNN fusion model of ``configs/default.yaml`` (batch 32, 64 px, 1 channel);
* the pretrained EfficientNet-Lite0 of ``configs/ham10000_pretrained.yaml`` with a frozen
  backbone (``model.trainable_stages=0``, batch 64, 64 px, 3 channels; the ImageNet weights of
  /work/shared/weights when present).

The DP side is what :func:`fedmed.privacy.make_private` returns (Opacus' GradSampleModule +
DPOptimizer, fedmed's Conv2d grad sampler); the plain side the same model with the same
optimizer. One step is timed in phases, interleaved plain / DP on one fixed batch:

* forward (DP: Opacus' forward hooks keep each layer's activations),
* backward (DP: Opacus' backward hooks turn them into per-sample gradients; the excess over
  the plain backward is the per-sample-gradient cost),
* clip (``DPOptimizer.clip_and_accumulate``: per-sample norms, clip factors, summed grads),
* noise (``add_noise``), then scale + the AdamW update.

Run: ``python -m benchmarks.dp_cost [--repeats 7] [--steps 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import ROOT

__all__ = ["MODELS", "main", "measure", "section"]

WEIGHTS = ROOT.parent / "shared" / "weights"
# name -> (config file, overrides): the configs' own batch sizes and image sizes
MODELS: dict[str, tuple[str, list[str]]] = {
    "fusion": ("default.yaml", []),
    "pretrained_frozen": ("ham10000_pretrained.yaml", ["model.trainable_stages=0"]),
}
PHASES = ("forward", "backward", "clip", "noise", "update")


def _setup(name: str):
    """(model, batch dict, labels, loss, train config) for ``name`` from its config."""
    from fedmed.config import load_config
    from fedmed.task import model_from_config

    file, overrides = MODELS[name]
    cfg = load_config(ROOT / "configs" / file, overrides)
    pretrained = cfg.model.pretrained_path
    if pretrained and not Path(pretrained).exists():  # same cost with random weights
        cfg = load_config(ROOT / "configs" / file, overrides + ["model.pretrained_path=null"])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    b, size, ch = cfg.train.batch_size, cfg.data.image_size, cfg.data.channels
    n_num, cards = len(cfg.data.numeric), [len(v) for v in cfg.data.categorical.values()]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, ch, size, size, generator=g), "num": torch.randn(b, n_num, generator=g),
             "num_missing": torch.zeros(b, n_num, dtype=torch.bool),
             "cat": torch.stack([torch.randint(0, c + 1, (b,), generator=g) for c in cards], 1) if cards
             else torch.zeros(b, 0, dtype=torch.long),
             "has_image": torch.ones(b), "has_record": torch.ones(b)}
    labels = torch.randint(0, len(cfg.data.classes), (b,), generator=g)
    info = {"config": file, "overrides": overrides, "batch": b, "size": size, "channels": ch,
            "pretrained_weights": bool(cfg.model.pretrained_path),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in model.parameters())}
    return model, batch, labels, nn.CrossEntropyLoss(), cfg, info


def _timer(store: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            store[key] += time.perf_counter() - t
    return wrapped


@contextmanager
def _per_layer(store: dict[str, float]) -> Iterator[None]:
    """Time Opacus' per-sample-gradient functions by layer (type and size), and its bookkeeping
    around them (rescaling the output gradients, storing the results), while inside."""
    from opacus import GradSampleModule
    from opacus.grad_sample import grad_sample_module as gsm_module

    saved = dict(GradSampleModule.GRAD_SAMPLERS)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(layer: nn.Module, activations: Any, backprops: torch.Tensor) -> Any:
            key = type(layer).__name__
            if isinstance(layer, nn.Conv2d):
                key += f" {layer.in_channels}→{layer.out_channels} @{backprops.shape[-2]}×{backprops.shape[-1]}"
            t = time.perf_counter()
            try:
                return fn(layer, activations, backprops)
            finally:
                store[key] = store.get(key, 0.0) + time.perf_counter() - t
        return timed

    def bookkeeping(fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                store["(Opacus: rescale + store per-sample grads)"] = (
                    store.get("(Opacus: rescale + store per-sample grads)", 0.0) + time.perf_counter() - t)
        return timed

    store_fn, rearrange = gsm_module.create_or_accumulate_grad_sample, GradSampleModule.rearrange_grad_samples
    GradSampleModule.GRAD_SAMPLERS.update({k: wrap(v) for k, v in saved.items()})
    gsm_module.create_or_accumulate_grad_sample = bookkeeping(store_fn)
    GradSampleModule.rearrange_grad_samples = bookkeeping(rearrange)
    try:
        yield
    finally:
        GradSampleModule.GRAD_SAMPLERS.clear()
        GradSampleModule.GRAD_SAMPLERS.update(saved)
        gsm_module.create_or_accumulate_grad_sample = store_fn
        GradSampleModule.rearrange_grad_samples = rearrange


def _contiguous_embedding_norms() -> None:
    """For the ``ghost_contiguous`` row only: Opacus' Embedding norm sampler ``.view``s its index
    input, which fails on the record model's column slices; hand it contiguous copies, to see
    what ghost clipping would cost once that is fixed. Undone by :func:`_restore_norm_samplers`."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping as G,
    )

    fn = G.NORM_SAMPLERS[nn.Embedding]
    _SAVED_NORMS.setdefault(nn.Embedding, fn)
    G.NORM_SAMPLERS[nn.Embedding] = lambda layer, acts, backprops: fn(layer, [a.contiguous() for a in acts], backprops)


_SAVED_NORMS: dict[type, Callable[..., Any]] = {}


def _restore_norm_samplers() -> None:
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping as G,
    )

    G.NORM_SAMPLERS.update(_SAVED_NORMS)
    _SAVED_NORMS.clear()


def _step_phases(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                 loss_fn: nn.Module, store: dict[str, float]) -> None:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(**batch).float(), labels)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()  # DP: clip / noise / scale are timed inside by the wrappers
    t3 = time.perf_counter()
    store["forward"] += t1 - t0
    store["backward"] += t2 - t1
    store["update"] += t3 - t2


def _measure_one(name: str, *, steps: int, repeats: int, grad_sample_mode: str = "hooks") -> dict[str, Any]:
    from fedmed.config import PrivacyConfig
    from fedmed.privacy import DP_CHANNELS_LAST, PrivacyLedger, make_private, plan_dp
    from fedmed.train.loop import make_optimizer, memory_format

    base, batch, labels, loss_fn, cfg, info = _setup(name)
    plain = copy.deepcopy(base)
    # each side in the memory format a site trains it in: plain per train.channels_last (NHWC on
    # CPU), DP in NCHW (fedmed.privacy.DP_CHANNELS_LAST, the format make_private's model gets)
    fmt = memory_format(torch.device("cpu"), cfg.train.channels_last)
    plain.to(memory_format=fmt)
    plain_batch = {**batch, "image": batch["image"].contiguous(memory_format=fmt)}
    dp_fmt = memory_format(torch.device("cpu"), DP_CHANNELS_LAST)
    batch = {**batch, "image": batch["image"].contiguous(memory_format=dp_fmt)}
    opt_plain = make_optimizer(plain, cfg.train)
    # sample dicts as a site's dataset yields them; its size only sets the sampling rate
    data = [{**{k: v[i] for k, v in batch.items()}, "label": labels[i]} for i in range(info["batch"])] * 8
    plan = plan_dp(privacy=PrivacyConfig(enabled=True), n_train=len(data), batch_size=info["batch"], rounds=1,
                   local_epochs=1)
    work = copy.deepcopy(base).to(memory_format=dp_fmt)
    dp_loss = loss_fn
    if grad_sample_mode in ("hooks", "samplers_only", "opacus_conv"):  # the production path, or parts of it
        with tempfile.TemporaryDirectory() as tmp:
            ledger = PrivacyLedger(Path(tmp) / "ledger.json", accountant=plan.accountant)
            dp_model, opt_dp, _, _ = make_private(work, make_optimizer(work, cfg.train), data, plan=plan,
                                                  ledger=ledger, fast_conv=grad_sample_mode == "hooks")
        if grad_sample_mode == "samplers_only":  # fedmed's samplers, the convs' batch gradients kept
            from fedmed.dp_conv import use_fast_conv2d

            use_fast_conv2d(True)
    else:  # Opacus' other modes, straight from its engine with the same noise and clipping
        from opacus import PrivacyEngine

        mode = grad_sample_mode.removesuffix("_contiguous")
        if grad_sample_mode == "ghost_contiguous":
            _contiguous_embedding_norms()
        made = PrivacyEngine(accountant=plan.accountant).make_private(
            module=work, optimizer=make_optimizer(work, cfg.train), noise_multiplier=plan.noise_multiplier,
            data_loader=torch.utils.data.DataLoader(data, batch_size=info["batch"]),
            max_grad_norm=plan.max_grad_norm, poisson_sampling=False, grad_sample_mode=mode,
            **({"criterion": loss_fn} if mode == "ghost" else {}))
        dp_model, opt_dp = made[0], made[1]
        if mode == "ghost":  # clipping happens in the loss's double backward
            dp_loss = made[2]
    dp_store = dict.fromkeys(PHASES, 0.0)
    for key, attr in (("clip", "clip_and_accumulate"), ("noise", "add_noise")):
        if hasattr(opt_dp, attr):
            setattr(opt_dp, attr, _timer(dp_store, key, getattr(opt_dp, attr)))

    def run(model: nn.Module, opt: torch.optim.Optimizer, store: dict[str, float]) -> dict[str, float]:
        for k in store:
            store[k] = 0.0
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            _step_phases(model, opt, batch if model is dp_model else plain_batch, labels,
                         dp_loss if model is dp_model else loss_fn, store)
        out = {k: v / steps for k, v in store.items()}
        out["total"] = (time.perf_counter() - t) / steps
        out["cpu"] = (time.process_time() - c) / steps  # steadier than wall time on a shared machine
        return out

    plain_store = dict.fromkeys(PHASES, 0.0)
    run(plain, opt_plain, plain_store), run(dp_model, opt_dp, dp_store)  # warm-up
    rows_plain, rows_dp = [], []
    for _ in range(repeats):
        rows_plain.append(run(plain, opt_plain, plain_store))
        rows_dp.append(run(dp_model, opt_dp, dp_store))
    for r in rows_dp:  # the optimizer step's wall includes clip and noise: keep only the rest
        r["update"] -= r["clip"] + r["noise"]
    ratios = [d["total"] / p["total"] for p, d in zip(rows_plain, rows_dp, strict=True)]
    cpu_ratios = [d["cpu"] / p["cpu"] for p, d in zip(rows_plain, rows_dp, strict=True)]
    layers: dict[str, float] = {}
    with _per_layer(layers):  # one more, separately timed pass: the wrappers cost a little
        run(dp_model, opt_dp, dp_store)
    layers = {k: 1000 * v / steps for k, v in sorted(layers.items(), key=lambda kv: -kv[1])}

    def med(rows: list[dict[str, float]], k: str) -> float:
        return statistics.median(r[k] for r in rows)

    return {**info, "grad_sample_mode": grad_sample_mode, "steps": steps, "repeats": repeats,
            "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
            "plain_ms": {k: 1000 * med(rows_plain, k) for k in (*PHASES, "total", "cpu") if k not in ("clip", "noise")},
            "dp_ms": {k: 1000 * med(rows_dp, k) for k in (*PHASES, "total", "cpu")},
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
            "ratios": ratios, "cpu_ratio_min": min(cpu_ratios), "cpu_ratio_median": statistics.median(cpu_ratios),
            "cpu_ratio_max": max(cpu_ratios), "per_sample_grad_ms_by_layer": layers}


#: Ways to the per-sample gradients, tried on the fusion model: ``hooks`` is fedmed's production
#: path (Opacus' hooks + fedmed's Conv2d / GroupNorm samplers + the convs' batch gradients
#: skipped), ``samplers_only`` the same with the batch gradients kept, ``opacus_conv`` Opacus'
#: hooks with its own samplers (fedmed's path before any of this), ``functorch`` / ``ghost``
#: (fast gradient clipping) / ``ew`` Opacus' other modes; ``ghost_contiguous`` is ghost past an
#: Opacus limitation (:func:`_contiguous_embedding_norms`).
MODES = ("hooks", "samplers_only", "opacus_conv", "functorch", "ghost", "ghost_contiguous", "ew")


def measure(*, steps: int = 3, repeats: int = 7, threads: int | None = 1,
            modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Plain vs DP step, in phases: every model in :data:`MODELS` on the production path, and
    the fusion model (the target's) also in each other of ``modes``; a mode that fails on the
    model is recorded with its error."""
    import os

    from fedmed.dp_conv import fast_conv2d_enabled, use_fast_conv2d

    old, old_conv = torch.get_num_threads(), fast_conv2d_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out: dict[str, Any] = {"threads": torch.get_num_threads(), "load_before": round(os.getloadavg()[0], 2)}
        for name in MODELS:
            for mode in modes if name == "fusion" else ("hooks",):
                try:
                    out[f"{name}/{mode}"] = _measure_one(name, steps=steps, repeats=repeats, grad_sample_mode=mode)
                except Exception as exc:  # noqa: BLE001 (a mode Opacus cannot run on this model is a result)
                    out[f"{name}/{mode}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                finally:
                    _restore_norm_samplers()
        out["load_after"] = round(os.getloadavg()[0], 2)
        return out
    finally:
        torch.set_num_threads(old)
        use_fast_conv2d(old_conv)


def section(res: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md lines for a :func:`measure` result."""
    lines = ["## DP cost at the sites' batch sizes, and where the time goes", "", "```bash",
             f"make bench-dp   # = python -m benchmarks.dp_cost --repeats {res.get('repeats', 7)}", "```", "",
             (f"{res['threads']} torch thread(s) (each site's process gets one here); load average before "
             f"{res['load_before']}, after {res.get('load_after', '-')}. "
             f"Each row: {next(v for k, v in res.items() if '/' in k and 'steps' in v)['steps']} steps "
             "on one fixed batch, plain and DP interleaved, medians over the repeats (ms per step). The DP path "
             "is `fedmed.privacy.make_private` (Opacus GradSampleModule + DPOptimizer; fedmed's Conv2d and "
             "GroupNorm grad samplers, and the convolutions' batch-summed weight gradients, which DP replaces, "
             "not computed: `fedmed/dp_conv.py`); *per-sample grads* = DP backward − plain backward (the "
             "per-sample gradients computed, net of the batch gradients skipped)."), "",
             ("| model (config, batch) | mode | plain ms | DP ms | DP ÷ plain (min / median / max) | "
             "CPU time DP ÷ plain (min / median / max) | "
             "forward plain → DP | backward plain → DP | per-sample grads | clip | noise | update plain → DP |"),
             "|---|---|---:|---:|---|---|---|---|---:|---:|---:|---|"]
    for key, r in res.items():
        if "/" not in key:
            continue
        if "error" in r:
            lines.append(f"| {key.split('/')[0]} | {key.split('/')[1]} | - | fails: {r['error']} "
                         "| - | - | - | - | - | - | - | - |")
            continue
        p, d = r["plain_ms"], r["dp_ms"]
        lines.append(
            f"| {key.split('/')[0]} ({r['config']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}, "
            f"{r['batch']} × {r['channels']}×{r['size']}², {r['trainable_params']:,} trainable) | "
            f"{r['grad_sample_mode']} | "
            f"{p['total']:.1f} | {d['total']:.1f} | {r['ratio_min']:.2f} / **{r['ratio_median']:.2f}** / "
            f"{r['ratio_max']:.2f} | {r['cpu_ratio_min']:.2f} / {r['cpu_ratio_median']:.2f} / "
            f"{r['cpu_ratio_max']:.2f} | {p['forward']:.1f} → {d['forward']:.1f} | {p['backward']:.1f} → "
            f"{d['backward']:.1f} | {d['backward'] - p['backward']:.1f} | {d['clip']:.1f} | {d['noise']:.1f} | "
            f"{p['update']:.1f} → {d['update']:.1f} |")
    for key, r in res.items():
        if key.endswith("/hooks") and r.get("per_sample_grad_ms_by_layer"):
            top = list(r["per_sample_grad_ms_by_layer"].items())
            lines += ["", f"{key}: Opacus' per-sample-gradient functions by layer, ms per step (total "
                      f"{sum(v for _, v in top):.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in top[:8])
                      + (f", {len(top) - 8} more {sum(v for _, v in top[8:]):.1f}" if len(top) > 8 else "") + "."]
    fusion = res.get("fusion/hooks")
    if fusion and "dp_ms" in fusion:
        p, d, layers = fusion["plain_ms"], fusion["dp_ms"], fusion["per_sample_grad_ms_by_layer"]
        extra, bwd = d["total"] - p["total"], d["backward"] - p["backward"]
        conv = sum(v for k, v in layers.items() if k.startswith("Conv2d"))
        book = layers.get("(Opacus: rescale + store per-sample grads)", 0.0)
        rest = sum(layers.values()) - conv - layers.get("GroupNorm", 0.0) - book
        kept = res.get("fusion/samplers_only", {})
        skipped = (f" Skipping the convolutions' batch weight gradients is worth "
                   f"{kept['ratio_median'] - fusion['ratio_median']:.2f}× of the plain step (CPU time "
                   f"{kept['cpu_ratio_median'] - fusion['cpu_ratio_median']:.2f}×): `samplers_only` keeps them."
                   if "dp_ms" in kept else "")
        lines += ["", (f"Where the fusion model's DP step goes: it adds {extra:.0f} ms to the plain step. The "
                       f"backward adds {bwd:.0f} ms ({bwd / extra:.0%}): the per-sample gradient functions take "
                       f"{sum(layers.values()):.0f} ms (the Conv2d layers {conv:.0f} ms, GroupNorm "
                       f"{layers.get('GroupNorm', 0.0):.0f} ms, the record and fusion layers {rest:.0f} ms, "
                       f"Opacus' bookkeeping around them {book:.0f} ms: rescaling each layer's output gradient by "
                       f"the batch size and copying the results into its own buffers), less the batch weight "
                       f"gradients of the convolutions, which DP skips. Then clipping {d['clip']:.1f} ms, noise "
                       f"{d['noise']:.1f} ms, the activations kept in the forward "
                       f"{d['forward'] - p['forward']:.0f} ms. A convolution's per-sample weight gradients are one "
                       "grouped convolution-backward call (the batch folded into the groups), the oneDNN kernel "
                       "that computes the plain batch weight gradient, at about its speed; they are written out "
                       "(batch × weights floats) before clipping reads them again." + skipped)]
        alts = {k.split("/")[1]: v for k, v in res.items() if k.startswith("fusion/") and k != "fusion/hooks"}
        if alts:
            lines += ["", "Other paths, same noise and clipping (`samplers_only`: fedmed's samplers with the "
                      "convolutions' batch gradients kept; `opacus_conv`: Opacus' hooks with its own samplers, "
                      "fedmed's path before issue 18; the rest Opacus' other modes): " + "; ".join(
                f"`{m}` " + (f"fails ({v['error'].split(':')[0]})" if "error" in v else
                             f"{v['ratio_median']:.2f}× (vs {fusion['ratio_median']:.2f}× for fedmed's path)")
                for m, v in alts.items()) + ". " + (
                f"Cheaper than the production path here: {', '.join(cheaper)}. " if (cheaper := [
                    m for m, v in alts.items() if v.get("ratio_median", 1e9) < fusion["ratio_median"]]) else
                "None is cheaper than the production path, so fedmed keeps it; clipping, noise and "
                "accounting are Opacus' on every path. ") + "`ghost` (fast gradient clipping) stops in Opacus' "
                "Embedding norm sampler (a `.view` of the record model's column-sliced category indices). Opacus "
                "1.6 has norm samplers only for Linear and Embedding, so even past that (`ghost_contiguous`) the "
                "Conv2d layers, where the time is, still materialise per-sample gradients, and ghost clipping "
                "adds a second backward (its backward column holds the norms, the clipping and both backward "
                "passes). `ew` (expanded weights) wraps a model of one positional input and "
                "fedmed's takes keyword tensors."]
    if fusion and "ratio_median" in fusion:
        ok = fusion["ratio_median"] <= 1.5
        lines += ["", (f"Target DP step ≤ 1.5× plain for the fusion model: median **{fusion['ratio_median']:.2f}** "
                       f"(CPU time {fusion['cpu_ratio_median']:.2f}) → {'met' if ok else '**missed**'}.")]
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="ways to the per-sample grads")
    p.add_argument("--doc", type=Path, default=None, help="update this doc's DP-cost section (docs/benchmarks.md)")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "dp_cost.json", help="raw numbers")
    a = p.parse_args(argv)
    res = measure(steps=a.steps, repeats=a.repeats, threads=a.threads, modes=tuple(a.modes))
    res["repeats"] = a.repeats
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    for line in section(res):
        print(line)
    if a.doc:
        from benchmarks.peers.report import update_doc

        update_doc(a.doc, dp=res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
