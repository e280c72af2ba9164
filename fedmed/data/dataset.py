"""The torch Dataset of sample dicts (see the table in ``docs/architecture.md``).

Record features are encoded once in ``__init__`` (the encoder is fitted on the training
patients only, in :func:`build_splits`); images come from an :class:`ImageCache` so each
file is decoded once. Augmentation applies to the training split only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fedmed.config import DataConfig
from fedmed.data.images import ImageCache, Preprocess
from fedmed.data.records import RecordEncoder
from fedmed.data.site import LoadSummary, SiteData
from fedmed.data.splits import fixed_splits, split_patients
from fedmed.errors import UsageError

if TYPE_CHECKING:  # torchvision (with torch._dynamo, ~1.5 s of CPU) loads only where a site augments
    from torchvision.transforms import v2

__all__ = ["SiteDataset", "SiteSplits", "train_augment", "train_transform", "build_splits",
           "class_counts", "dataset_size"]

log = logging.getLogger(__name__)
Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]


def train_augment(size: int, channels: int = 3, *, any_orientation: bool = False) -> v2.Compose:
    """Label-preserving augmentation that never paints a border: flip, crop-zoom, colour.

    ``RandomResizedCrop`` (75–100 % of the area, aspect 0.9–1.1, back to ``size``) zooms
    without the zero-filled corners a rotation or zoom-out leaves; a network can key on
    such artificial borders (Grad-CAM mass on the corners). Brightness/contrast jitter
    (and saturation/hue for RGB) covers device and lighting differences between sites.
    ``any_orientation`` (dermoscopy, histology: no up or down) adds vertical flips and
    quarter turns — exact on square images, so still no painted corners — and takes away
    fixed-position cues such as a lighting gradient along one edge.
    """
    from torchvision.transforms import v2

    jitter = (v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
              if channels == 3 else v2.ColorJitter(brightness=0.2, contrast=0.2))
    turns: list[v2.Transform] = []
    if any_orientation:
        turns = [v2.RandomVerticalFlip(),
                 v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)])]
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        *turns,
        v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
        jitter,
    ])


def train_transform(data_cfg: DataConfig, *, augment: bool | None = None) -> v2.Compose | None:
    """The training split's augmentation a config asks for (None with ``augment: false``;
    ``augment`` overrides the config's)."""
    if not (data_cfg.augment if augment is None else augment):
        return None
    return train_augment(data_cfg.image_size, data_cfg.channels,
                         any_orientation=data_cfg.any_orientation)


class SiteDataset(Dataset):
    """Sample dicts for some rows of a site's ``samples`` table.

    ``cache`` None means images are not loaded: every sample gets a zero image and
    ``has_image`` 0 (e.g. a record-only model). ``tokenizer`` (``list[str] -> dict(input_ids,
    attention_mask)``) adds ``notes_ids``/``notes_mask``; notes are tokenised once here.
    """

    def __init__(
        self,
        samples: pd.DataFrame,
        records: pd.DataFrame,
        *,
        encoder: RecordEncoder,
        spec: Preprocess,
        cache: ImageCache | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tokenizer: Tokenizer | None = None,
        notes_column: str | None = None,
    ) -> None:
        self.samples = samples.reset_index(drop=True)
        self.cache, self.spec, self.transform = cache, spec, transform
        self.labels = np.array(self.samples["label"], dtype=np.int64)
        self.paths: list[str | None] = [p if isinstance(p, str) else None
                                        for p in self.samples["image_path"]]
        has_rec = np.array(self.samples["has_record"], dtype=bool)
        use_img = np.array(self.samples["has_image"], dtype=bool) & (cache is not None)
        self.has_image = torch.tensor(use_img, dtype=torch.float32)
        self.has_record = torch.tensor(has_rec, dtype=torch.float32)
        rows = records.reindex(self.samples["patient_id"].where(has_rec))
        enc = encoder.transform(rows)
        enc["num"][~has_rec] = 0.0
        enc["num_missing"][~has_rec] = True
        enc["cat"][~has_rec] = 0
        self.num = torch.from_numpy(np.ascontiguousarray(enc["num"], dtype=np.float32))
        self.num_missing = torch.from_numpy(np.ascontiguousarray(enc["num_missing"], dtype=bool))
        self.cat = torch.from_numpy(np.ascontiguousarray(enc["cat"], dtype=np.int64))
        self.notes: dict[str, torch.Tensor] | None = None
        if tokenizer is not None:
            if not notes_column:
                raise UsageError("a notes tokenizer was given but data.notes_column is not set")
            texts = rows[notes_column] if notes_column in rows.columns else pd.Series(
                index=rows.index, dtype=object)
            texts = ["" if not isinstance(t, str) else t for t in texts.tolist()]
            tok = tokenizer(texts)
            self.notes = {"notes_ids": torch.as_tensor(tok["input_ids"], dtype=torch.int64),
                          "notes_mask": torch.as_tensor(tok["attention_mask"], dtype=torch.int64)}

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, i: int) -> torch.Tensor:
        if self.has_image[i] == 0:
            return torch.zeros(self.spec.channels, self.spec.size, self.spec.size)
        path, cache = self.paths[i], self.cache
        assert cache is not None and path is not None, "has_image is 1 only with a cache and an image path"
        arr = cache.load(path)
        img = torch.from_numpy(arr.astype(np.float32) / 255.0)
        if self.transform is not None:
            img = self.transform(img).clamp(0.0, 1.0)
        return img

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "image": self._image(i),
            "num": self.num[i],
            "num_missing": self.num_missing[i],
            "cat": self.cat[i],
            "has_image": self.has_image[i],
            "has_record": self.has_record[i],
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
        }
        if self.notes is not None:
            item["notes_ids"] = self.notes["notes_ids"][i]
            item["notes_mask"] = self.notes["notes_mask"][i]
        return item


def dataset_size(dataset: Dataset) -> int:
    """How many samples a map-style dataset holds.

    torch types ``DataLoader.dataset`` as a bare ``Dataset``, which has no ``__len__`` (iterable
    datasets have none); a dataset without one raises TypeError here, as ``len()`` would.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no length")
    return len(dataset)


def class_counts(dataset: SiteDataset, n_classes: int | None = None) -> np.ndarray:
    """Samples per class (for class weights); length ``n_classes`` when given."""
    minlength = n_classes if n_classes is not None else 0
    return np.bincount(dataset.labels, minlength=minlength).astype(np.int64)


@dataclass
class SiteSplits:
    """A site's train/val/test datasets plus the encoder fitted on its training patients."""

    train: SiteDataset
    val: SiteDataset
    test: SiteDataset
    encoder: RecordEncoder
    indices: dict[str, np.ndarray]
    summary: LoadSummary


def build_splits(
    site: SiteData,
    data_cfg: DataConfig,
    *,
    cache: ImageCache | None = None,
    tokenizer: Tokenizer | None = None,
    augment: bool | None = None,
    progress: bool = True,
) -> SiteSplits:
    """Split patients, fit the :class:`RecordEncoder` on TRAIN patients only, build datasets.

    With a ``cache``, every image is decoded up front (``cache.prepare``) so unreadable files
    fail at once with one :class:`~fedmed.data.images.ImageError`. Without one, images are
    not loaded (zero images, ``has_image`` 0). ``augment`` defaults to ``data_cfg.augment``.
    """
    samples = site.samples
    spec = cache.spec if cache is not None else Preprocess.from_config(data_cfg)
    if cache is not None:
        rows = samples.loc[samples["has_image"]]
        if len(rows):  # failures are named by images.csv line, never by file name
            lines = rows["image_line"] if "image_line" in rows else pd.Series(pd.NA, index=rows.index)
            where = [f"{site}: images.csv line {line}, column 'image'" if pd.notna(line)
                     else f"{site}: image {k + 1} of {len(rows)}"
                     for k, (site, line) in enumerate(zip(rows["site"], lines, strict=True))]
            cache.prepare(rows["image_path"].tolist(), where=where, progress=progress)
    elif bool(samples["has_image"].any()):
        log.info("build_splits: no image cache given; image samples get zero images")
    if data_cfg.split_column:
        idx = fixed_splits(samples, val_fraction=data_cfg.val_fraction, seed=data_cfg.split_seed)
    else:
        idx = split_patients(samples, val_fraction=data_cfg.val_fraction,
                             test_fraction=data_cfg.test_fraction, seed=data_cfg.split_seed)
    train_rows = samples.iloc[idx["train"]]
    train_ids = train_rows.loc[train_rows["has_record"], "patient_id"].unique()
    encoder = RecordEncoder(numeric=data_cfg.numeric, categorical=data_cfg.categorical,
                            imputation=data_cfg.imputation)
    encoder.fit(site.records.loc[list(train_ids)])
    # Only loaded images are augmented: without a cache nothing would be, and building the
    # augmentation imports torchvision (with torch._dynamo, ~1.9 CPU-s) for nothing.
    transform = train_transform(data_cfg, augment=augment) if cache is not None else None
    common: dict[str, Any] = {"encoder": encoder, "spec": spec, "cache": cache,
                              "tokenizer": tokenizer, "notes_column": data_cfg.notes_column}
    sets = {name: SiteDataset(samples.iloc[pos], site.records,
                              transform=transform if name == "train" else None,
                              **common)
            for name, pos in idx.items()}
    return SiteSplits(train=sets["train"], val=sets["val"], test=sets["test"], encoder=encoder,
                      indices=idx, summary=site.summary)
