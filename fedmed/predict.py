"""``fedmed predict``: a saved model on new patients, no labels needed.

Input is a site folder (``records.*`` and/or ``images.csv``, as in training, labels
optional), a folder of images (every DICOM / raster file below it), or one records table.
Output is one CSV row per sample, keyed by the input's own ids (``patient_id`` and the
``image`` path as written in the input), with the calibrated probability of every class
(``softmax(logits / T)``, the checkpoint's fitted ``T``) and the predicted class. A
missing modality is handled as in training: no image → zero image and ``has_image`` 0;
no record → ``has_record`` 0.

Records are encoded with the encoder saved in the checkpoint (local models). A federated
model has none — every site z-scored with its own training patients' statistics — so the
encoder is fitted on ``--reference`` (a site folder with labels: its training split, as that
site did in training) or else on the input's own rows (no labels involved).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedmed.checkpoint import Checkpoint
from fedmed.config import DataConfig
from fedmed.data.images import DICOM_SUFFIXES, RASTER_SUFFIXES
from fedmed.data.records import RecordEncoder, normalise_value, read_table, to_numeric
from fedmed.errors import UsageError
from fedmed.fit_check import RECORD_FILES, DataMismatch, check_site, feature_problems

__all__ = ["PredictInput", "read_input", "dataset_for", "logits_of", "probabilities", "predict"]

MIN_ROWS_TO_FIT = 30  # fewer rows than this give z-score statistics too noisy to trust


@dataclass
class PredictInput:
    """Samples (one row per image or image-less patient), records by patient id, output keys."""

    kind: str
    samples: pd.DataFrame
    records: pd.DataFrame
    keys: pd.DataFrame


def _ids(col: pd.Series) -> pd.Series:
    return col.map(normalise_value).astype(object)


def _records(df: pd.DataFrame, data: DataConfig, *, where: str) -> pd.DataFrame:
    problems = feature_problems(list(df.columns), data, where=where)
    if problems:
        raise DataMismatch("; ".join(problems))
    ids = _ids(df[data.id_column])
    if ids.isna().any() or ids.duplicated().any():
        raise DataMismatch(f"{where}: column {data.id_column!r} must hold one non-empty id per row "
                           f"({int(ids.isna().sum())} empty, {int(ids.duplicated().sum())} repeated)")
    out = pd.DataFrame(index=pd.Index(ids.to_numpy(), name="patient_id"))
    for col in (*data.numeric, *data.categorical):
        out[col] = to_numeric(df[col]).to_numpy() if col in data.numeric else df[col].to_numpy()
    return out


def _samples(images: pd.DataFrame | None, records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    parts, keys = [], []
    img_ids = set()
    if images is not None:
        img_ids = set(images["patient_id"])
        parts.append(pd.DataFrame({"patient_id": images["patient_id"], "image_path": images["full"],
                                   "has_image": True}))
        keys.append(pd.DataFrame({"patient_id": images["patient_id"], "image": images["image"]}))
    only = [i for i in records.index if i not in img_ids]
    parts.append(pd.DataFrame({"patient_id": only, "image_path": None, "has_image": False}))
    keys.append(pd.DataFrame({"patient_id": only, "image": ""}))
    samples = pd.concat(parts, ignore_index=True)
    samples["patient_id"] = samples["patient_id"].astype(str)
    samples["has_record"] = samples["patient_id"].isin(set(map(str, records.index)))
    samples["label"] = -1  # unknown: never read
    records.index = records.index.astype(str)
    return samples, pd.concat(keys, ignore_index=True)


def read_input(path: str | Path, data: DataConfig) -> PredictInput:
    """A site folder, an images folder or a records table → :class:`PredictInput`.

    Raises :class:`~fedmed.fit_check.DataMismatch` when records lack the model's features
    or images have another channel count, ``FileNotFoundError`` for a missing path.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    empty = pd.DataFrame(columns=[*data.numeric, *data.categorical],
                         index=pd.Index([], name="patient_id", dtype=object))
    if path.is_file():
        records = _records(read_table(path), data, where=path.name)
        samples, keys = _samples(None, records)
        return PredictInput("table", samples, records, keys)
    rec = next((path / n for n in RECORD_FILES if (path / n).is_file()), None)
    if rec is not None or (path / "images.csv").is_file():
        check_site(path, data, labels=False)
        records = _records(read_table(rec), data, where=rec.name) if rec is not None else empty
        images = None
        if (path / "images.csv").is_file():
            df = read_table(path / "images.csv")
            if "image" not in df.columns or data.id_column not in df.columns:
                raise DataMismatch(f"images.csv needs columns 'image' and {data.id_column!r}")
            images = pd.DataFrame({"patient_id": _ids(df[data.id_column]).to_numpy(),
                                   "image": df["image"].astype(str).str.strip().to_numpy()})
            images["full"] = [str(Path(p) if Path(p).is_absolute() else path / p) for p in images["image"]]
        samples, keys = _samples(images, records)
        return PredictInput("site", samples, records, keys)
    suffixes = {s for s in (*DICOM_SUFFIXES, *RASTER_SUFFIXES) if s}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"{path}: no records table, images.csv or image files ({sorted(suffixes)})")
    rel = [str(p.relative_to(path)) for p in files]
    images = pd.DataFrame({"patient_id": rel, "image": rel, "full": [str(p) for p in files]})
    from fedmed.fit_check import _channel_problem

    problems, _ = _channel_problem(files, data)
    if problems:
        raise DataMismatch(f"images under {path.name} do not fit the model: {problems[0]}")
    samples, keys = _samples(images, empty)
    return PredictInput("images", samples, empty, keys)


def _reference_encoder(ckpt: Checkpoint, reference: str | Path) -> RecordEncoder:
    """The encoder a reference site fits on its own training split (labels needed there)."""
    from fedmed.task import load_site_bundle

    cfg = ckpt.config.model_copy(update={"model": ckpt.config.model.model_copy(update={"variant": "record"})})
    return load_site_bundle(cfg, site_dir=reference, progress=False).splits.encoder


def dataset_for(ckpt: Checkpoint, inp: PredictInput, *, reference: str | Path | None = None,
                cache_dir: str | None = None, progress: bool = False) -> tuple[Dataset, str]:
    """The model's own preprocessing of the input; returns the dataset and where the
    record encoder came from (``checkpoint``, ``reference``, ``input`` or ``none``)."""
    from fedmed.data.dataset import SiteDataset
    from fedmed.data.images import ImageCache, Preprocess

    d = ckpt.config.data
    spec = Preprocess.from_config(d)
    encoder, source = ckpt.record_encoder(), "checkpoint"
    if encoder is None and reference is not None:
        encoder, source = _reference_encoder(ckpt, reference), "reference"
    if encoder is None:
        encoder = RecordEncoder(numeric=d.numeric, categorical=d.categorical, imputation=d.imputation)
        encoder.fit(inp.records)
        source = "input" if len(inp.records) else "none"
        if 0 < len(inp.records) < MIN_ROWS_TO_FIT and d.numeric:
            warnings.warn(f"the record encoder is fitted on only {len(inp.records)} input rows; pass "
                          "--reference SITE_DIR for stable statistics", stacklevel=2)
    cache = None
    if ckpt.config.model.variant != "record" and bool(inp.samples["has_image"].any()):
        cache = ImageCache(cache_dir or d.cache_dir, spec)
        cache.prepare(inp.samples.loc[inp.samples["has_image"], "image_path"].tolist(), progress=progress)
    ds = SiteDataset(inp.samples, inp.records, encoder=encoder, spec=spec, cache=cache)
    return ds, source


@torch.no_grad()
def logits_of(model: nn.Module, dataset: Dataset, *, batch_size: int = 128,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Float64 logits ``(N, C)`` of every sample, model in eval mode (labels not read)."""
    model.eval().to(device)
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("label", "meta")}
        out.append(model(**inputs).float().cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def probabilities(logits: np.ndarray, *, temperature: float = 1.0, multilabel: bool = False) -> np.ndarray:
    """Calibrated probabilities: ``softmax(logits / T)`` (sigmoid, no T, for multi-label)."""
    z = np.asarray(logits, dtype=np.float64)
    if multilabel:
        return 1.0 / (1.0 + np.exp(-z))
    z = z / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(ckpt: Checkpoint, source: str | Path, *, reference: str | Path | None = None,
            cache_dir: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predictions for every sample of ``source``: a table and what was used to make them."""
    if ckpt.config.model.notes.enabled:
        raise UsageError("fedmed predict does not support models with clinical notes yet")
    inp = read_input(source, ckpt.config.data)
    ds, enc_source = dataset_for(ckpt, inp, reference=reference, cache_dir=cache_dir)
    model = ckpt.build_model()
    probs = probabilities(logits_of(model, ds), temperature=ckpt.calibrated_temperature,
                          multilabel=ckpt.config.model.multilabel)
    classes = ckpt.classes
    table = inp.keys.copy()
    if inp.kind == "table":
        table = table.drop(columns=["image"])
    for j, c in enumerate(classes):
        table[f"p_{c}"] = probs[:, j]
    table["predicted"] = [classes[i] for i in probs.argmax(axis=1)] if len(probs) else []
    table["has_image"] = inp.samples["has_image"].astype(int).to_numpy() * int(
        ckpt.config.model.variant != "record")
    table["has_record"] = inp.samples["has_record"].astype(int).to_numpy()
    info = {"input": inp.kind, "samples": len(table), "temperature": ckpt.calibrated_temperature,
            "temperature_fitted": ckpt.temperature is not None, "record_encoder": enc_source}
    return table, info
