"""``fedmed export``: a saved model as ONNX or TorchScript, with its preprocessing sidecar.

The exported graph takes the tensors of fedmed's sample dict (``image`` in [0, 1] after
the preprocessing the sidecar describes, ``num``/``num_missing``/``cat`` from the record
encoder, ``has_image``/``has_record`` modality masks) and returns ``logits`` and calibrated
``probabilities`` (``softmax(logits / T)`` with the checkpoint's fitted temperature; sigmoid
for multi-label models). Image standardisation (mean/std) is inside the graph; the sidecar
still lists it, with everything else a runtime outside fedmed needs: classes, image size,
channels, DICOM window, record features and their fitted encoder, the temperature.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (needs ``onnx`` and ``onnxscript``:
``pip install fedmed[export]``); TorchScript through ``torch.jit.trace``, which PyTorch has
deprecated but still ships and which needs nothing else.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fedmed
from fedmed.checkpoint import Checkpoint
from fedmed.errors import MissingExtra, UsageError

__all__ = ["CalibratedModel", "export_model", "sidecar", "example_inputs", "input_names"]

FORMATS = {"onnx": ".onnx", "torchscript": ".ts"}
OUTPUTS = ("logits", "probabilities")


class CalibratedModel(nn.Module):
    """``FusionModel`` with positional inputs → ``(logits, probabilities)``; what is exported."""

    def __init__(self, model: nn.Module, *, names: list[str], temperature: float, multilabel: bool) -> None:
        super().__init__()
        self.model, self.names, self.multilabel = model, list(names), multilabel
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(**dict(zip(self.names, inputs, strict=True)))
        if self.multilabel:
            return logits, torch.sigmoid(logits)
        return logits, torch.softmax(logits / self.temperature, dim=-1)


def input_names(ckpt: Checkpoint) -> list[str]:
    """The graph's inputs for this model's variant (absent feature kinds are left out)."""
    cfg = ckpt.config
    if cfg.model.notes.enabled:
        raise UsageError("export of models with clinical notes is not supported (the tokenizer "
                         "would have to be exported too); export a model without model.notes")
    names: list[str] = []
    if cfg.model.variant in ("fusion", "image"):
        names += ["image", "has_image"]
    if cfg.model.variant in ("fusion", "record"):
        if cfg.data.numeric:
            names += ["num", "num_missing"]
        if cfg.data.categorical:
            names += ["cat"]
        names += ["has_record"]
    return names


def example_inputs(ckpt: Checkpoint, *, batch: int = 2) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes and dtypes (tracing, tests)."""
    d = ckpt.config.data
    gen = torch.Generator().manual_seed(0)
    all_inputs = {
        "image": torch.rand(batch, d.channels, d.image_size, d.image_size, generator=gen),
        "has_image": torch.ones(batch),
        "num": torch.randn(batch, len(d.numeric), generator=gen),
        "num_missing": torch.zeros(batch, len(d.numeric), dtype=torch.bool),
        "cat": torch.ones(batch, len(d.categorical), dtype=torch.int64),
        "has_record": torch.ones(batch),
    }
    return {k: all_inputs[k] for k in input_names(ckpt)}


def _image_stats(model: nn.Module) -> dict[str, list[float]] | None:
    branch = getattr(model, "image_branch", None)
    if branch is None:
        return None
    return {"mean": branch.mean.flatten().tolist(), "std": branch.std.flatten().tolist()}


def sidecar(ckpt: Checkpoint, model: nn.Module, *, model_file: str, fmt: str) -> dict[str, Any]:
    """Everything a runtime needs around the graph; JSON-serialisable, no patient data."""
    cfg, d = ckpt.config, ckpt.config.data
    ex = example_inputs(ckpt, batch=1)
    stats = _image_stats(model)
    image = None
    if stats is not None:
        image = {"size": d.image_size, "channels": d.channels, **stats, "window": d.window,
                 "clahe": d.clahe, "denoise": d.denoise, "color_constancy": d.color_constancy,
                 "note": "feed pixels scaled to [0, 1] after resizing to size x size (channels first); "
                         "the graph subtracts mean and divides by std itself"}
    records = None
    if cfg.model.variant in ("fusion", "record"):
        records = {
            "numeric": list(d.numeric), "categorical": {k: list(v) for k, v in d.categorical.items()},
            "imputation": d.imputation, "encoder": ckpt.encoder,
            "note": ("num = (value - mean) / std, missing values get the median's z-score and "
                     "num_missing true; cat = 1 + position in the vocabulary, 0 = missing/unknown"
                     if ckpt.encoder is not None else
                     "federated model: each site z-scores with the mean/std/median of its own training "
                     "patients; fit those on the data to be scored (fedmed predict does)"),
        }
    return {
        "fedmed_version": fedmed.__version__, "format": fmt, "model_file": model_file,
        "name": cfg.name, "variant": cfg.model.variant, "classes": list(d.classes),
        "multilabel": cfg.model.multilabel,
        "inputs": [{"name": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": ["batch", *v.shape[1:]]}
                   for k, v in ex.items()],
        "outputs": list(OUTPUTS),
        "temperature": ckpt.calibrated_temperature, "temperature_fitted": ckpt.temperature is not None,
        "missing_modalities": "a sample without an image: zero image and has_image 0; without a record: "
                              "zeros, num_missing true, cat 0 and has_record 0 (as in training)",
        "image": image, "records": records,
        "source": {"checkpoint": ckpt.path.name,
                   **{k: v for k, v in ckpt.meta.items() if isinstance(v, (int, float, str))}},
    }


def export_model(ckpt: Checkpoint, out: str | Path, *, fmt: str = "onnx") -> tuple[Path, Path]:
    """Write the model file and ``<model file>.json`` (the sidecar); returns both paths.

    Raises ``ValueError`` for an unknown format or a notes model, ``MissingExtra`` (a ``ModuleNotFoundError``)
    (with the install hint) when ONNX export's packages are missing.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; valid: {sorted(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = ckpt.build_model().requires_grad_(False)  # inference graphs: no autograd state
    names = input_names(ckpt)
    wrapped = CalibratedModel(model, names=names, temperature=ckpt.calibrated_temperature,
                              multilabel=ckpt.config.model.multilabel).eval()
    ex = example_inputs(ckpt)
    args = tuple(ex[k] for k in names)
    with warnings.catch_warnings():
        # attention maps kept for explanations are plain attributes; harmless in a graph
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape reads fixed per model
        if fmt == "onnx":
            _export_onnx(wrapped, args, names, out)
        else:
            torch.jit.trace(wrapped, args, check_trace=False).save(str(out))
    meta = out.with_name(out.name + ".json")
    meta.write_text(json.dumps(sidecar(ckpt, model, model_file=out.name, fmt=fmt), indent=2))
    return out, meta


def _export_onnx(wrapped: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], out: Path) -> None:
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ModuleNotFoundError:
            raise MissingExtra(f"ONNX export needs the {mod!r} package: pip install 'fedmed[export]'",
                               name=mod) from None
    batch = torch.export.Dim("batch", min=1)
    shapes = (tuple({0: batch} for _ in names),)  # forward(*inputs): one var-positional argument
    program = torch.onnx.export(wrapped, args, input_names=names, output_names=list(OUTPUTS),
                                dynamic_shapes=shapes, dynamo=True, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    # The exporter names intermediate values after their op ("cat" for torch.cat), which can
    # collide with an input of the same name; ONNX Runtime then refuses the file.
    graph = program.model.graph
    taken = set(names)
    for node in graph:
        for value in node.outputs:
            if value.name in taken and value not in graph.inputs:
                value.name = f"{value.name}__{id(value):x}"
    program.save(str(out))
