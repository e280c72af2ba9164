"""Read any supported image, preprocess it to a fixed tensor shape, and cache the result.

Decoding a DICOM or a large JPEG costs far more than a training step, so each file is
decoded once per preprocessing spec and stored as a small ``uint8`` ``.npy`` under
``<cache_dir>/<spec.key()>/``. Errors say what is wrong but never the file's name or path:
site file names are often built from patient ids (``MRN123_chest.dcm``) and absolute paths
name the site's machine, and error text may travel (logs, replies). Callers that know where a
path came from say so (``ImageCache.prepare(..., where=["images.csv line 12, column 'image'"])``);
the path itself is kept on :attr:`ImageError.path` and written to the site's own log at debug
level only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import median_filter
from skimage.exposure import equalize_adapthist
from skimage.transform import resize
from tqdm.auto import tqdm

from fedmed.data.dicom import DicomError, read_dicom
from fedmed.errors import FedmedError

__all__ = [
    "ImageError",
    "DICOM_SUFFIXES",
    "RASTER_SUFFIXES",
    "read_image",
    "Preprocess",
    "preprocess",
    "shades_of_grey",
    "ImageCache",
]

DICOM_SUFFIXES = ("", ".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CACHE_VERSION = 1  # bump when preprocessing output changes for the same spec
_MEMO_LIMIT = 2 * 1024**3
_LIST_MAX = 20
log = logging.getLogger(__name__)


class ImageError(FedmedError, ValueError):
    """An image file is missing, unsupported or unreadable.

    The message says why, never which file (see the module docstring); ``path`` holds the
    file for the site's own debug log and must not be put into anything that leaves it.
    """

    def __init__(self, reason: str, *, path: str | Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else str(path)


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                return np.asarray(im, dtype=np.float32) / 65535.0
            if mode == "I":
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
                return (np.clip(arr, 0, None) / top).astype(np.float32)
            if mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
                return out.astype(np.float32)
            if mode in ("1", "L", "LA", "La"):
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"not a readable image (corrupt or truncated: {type(exc).__name__})", path=path
        ) from None
    except Image.DecompressionBombError:
        raise ImageError("image too large to decode safely", path=path) from None


def read_image(
    path: str | Path, *, window: tuple[float, float] | None = None, multiframe: str = "middle"
) -> np.ndarray:
    """Read an image as float32 in [0, 1]: ``(H, W)`` gray or ``(H, W, 3)`` RGB.

    DICOM (``.dcm``, ``.dicom`` or no extension) goes through :func:`read_dicom` with
    ``window`` and the ``multiframe`` policy; PNG/JPEG/BMP/TIFF through Pillow (16-bit
    scaled by 65535). Raises :class:`ImageError` (why, without the file name; the file on
    ``.path``) when it is missing, unsupported or corrupt.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DICOM_SUFFIXES and suffix not in RASTER_SUFFIXES:
        raise ImageError(
            f"unsupported image type {suffix!r} "
            f"(supported: .dcm, .dicom, {', '.join(RASTER_SUFFIXES)})", path=path
        )
    if not path.is_file():
        raise ImageError("file not found", path=path)
    if suffix in DICOM_SUFFIXES:
        try:
            return read_dicom(path, window=window, multiframe=multiframe)
        except DicomError as exc:
            raise ImageError(str(exc), path=path) from exc
    img = _read_raster(path)
    return np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0)


@dataclass(frozen=True)
class Preprocess:
    """How decoded images become model inputs; part of the cache key."""

    size: int
    channels: int = 1
    window: tuple[float, float] | None = None
    clahe: bool = False
    denoise: bool = False
    color_constancy: bool = False
    multiframe: str = "middle"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.window is not None:
            object.__setattr__(self, "window", (float(self.window[0]), float(self.window[1])))

    @classmethod
    def from_config(cls, data_cfg: Any) -> Preprocess:
        """The spec a :class:`~fedmed.config.DataConfig` asks for."""
        return cls(size=data_cfg.image_size, channels=data_cfg.channels,
                   window=data_cfg.window, clahe=data_cfg.clahe, denoise=data_cfg.denoise,
                   color_constancy=data_cfg.color_constancy,
                   multiframe=getattr(data_cfg, "multiframe", "middle"))

    def key(self) -> str:
        """A stable short hash of the fields (same spec → same cache folder)."""
        fields = asdict(self)
        if not self.color_constancy:  # specs from before the field keep their cache folder
            del fields["color_constancy"]
        if self.multiframe == "middle":  # likewise: the default before the field existed
            del fields["multiframe"]
        blob = json.dumps({"v": _CACHE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=-1)
    lum = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma
    return (img[..., :3] @ lum)[..., None]


def shades_of_grey(img: np.ndarray, p: int = 6) -> np.ndarray:
    """Colour constancy: divide each channel by its Minkowski-``p`` mean (the light's colour).

    Shades of grey (Finlayson & Trezzi 2004) with ``p = 6`` is the colour normalisation that
    dermoscopy models use across clinics (Barata et al. 2015; ISIC challenge winners): each
    centre's camera and lighting tint the skin, and a network learns the tint as a site label.
    The illuminant estimate is scaled to unit length × √3, so a grey image is unchanged.
    Hand-rolled (five lines): scikit-image has no colour constancy, and OpenCV (not a
    dependency) has only grey-world, the ``p = 1`` case.
    ``(H, W, 3)`` float in [0, 1] → same shape, clipped to [0, 1]; grey input is returned as is.
    """
    if img.ndim != 3 or img.shape[-1] != 3:
        return img
    x = np.asarray(img, dtype=np.float64)
    light = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    norm = float(np.linalg.norm(light))
    if norm <= 1e-8:
        return img
    light = light / norm * np.sqrt(3.0)
    return np.clip(x / np.maximum(light, 1e-8), 0.0, 1.0).astype(np.float32)


def preprocess(img: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Float [0, 1] ``(H, W)`` / ``(H, W, 3)`` → ``uint8`` ``(C, size, size)``.

    Order: channels, optional colour constancy (:func:`shades_of_grey`), optional median
    denoise (3x3, cheap), optional CLAHE, anti-aliased resize to ``size × size`` (aspect
    ratio is not kept).
    """
    x = _to_channels(np.asarray(img, dtype=np.float32), spec.channels)
    if spec.color_constancy:
        x = shades_of_grey(x)
    if spec.denoise:
        x = median_filter(x, size=(3, 3, 1), mode="nearest")
    if spec.clahe:
        if x.shape[-1] == 1:
            x = equalize_adapthist(x[..., 0], clip_limit=0.01)[..., None]
        else:
            x = equalize_adapthist(x, clip_limit=0.01)  # works on the HSV value channel
    if x.shape[:2] != (spec.size, spec.size):
        x = resize(x, (spec.size, spec.size, x.shape[-1]), order=1, anti_aliasing=True,
                   preserve_range=True)
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    return np.ascontiguousarray(np.rint(x * 255.0).astype(np.uint8).transpose(2, 0, 1))


def _default_cache_dir() -> Path:
    env = os.environ.get("FEDMED_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmed" / "images"


class ImageCache:
    """Decoded, preprocessed images on disk (``.npy``) with a bounded in-memory memo.

    A file's cache entry is keyed by its absolute path, modification time and size, so an
    edited file is decoded again. ``hits``/``misses`` count loads served from the cache /
    decoded. Unwritable cache folders degrade to memory only, with one warning.
    """

    def __init__(self, cache_dir: str | Path | None, spec: Preprocess,
                 *, memo_bytes: int = _MEMO_LIMIT) -> None:
        self.spec = spec
        root = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
        self.dir = root / spec.key()
        self.memo_bytes = int(memo_bytes)
        self.hits = 0
        self.misses = 0
        self._memo: dict[str, np.ndarray] = {}
        self._memo_size = 0
        self._writable = True

    def _entry(self, path: Path) -> tuple[str, Path]:
        path = path.expanduser().absolute()
        try:
            st = path.stat()
        except OSError:
            raise ImageError("file not found", path=path) from None
        ident = f"{path}\0{st.st_mtime_ns}\0{st.st_size}"
        key = hashlib.sha1(ident.encode()).hexdigest()
        return key, self.dir / f"{key}.npy"

    def _remember(self, key: str, arr: np.ndarray) -> np.ndarray:
        arr.flags.writeable = False  # shared with the memo: callers must copy to change it
        if self._memo_size + arr.nbytes < self.memo_bytes:
            self._memo[key] = arr
            self._memo_size += arr.nbytes
        return arr

    def _write(self, target: Path, arr: np.ndarray) -> None:
        if not self._writable:
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npy")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._writable = False
            warnings.warn(f"image cache {self.dir} is not writable ({type(exc).__name__}); "
                          "decoded images are kept in memory only", stacklevel=3)

    def _read_cached(self, target: Path) -> np.ndarray | None:
        try:
            arr = np.load(target, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # absent or damaged: decode again
        expected = (self.spec.channels, self.spec.size, self.spec.size)
        return arr if arr.dtype == np.uint8 and arr.shape == expected else None

    def load(self, path: str | Path) -> np.ndarray:
        """The preprocessed ``uint8`` ``(C, size, size)`` image (read-only array).

        Raises :class:`ImageError` (why, not which file) if it cannot be read.
        """
        key, target = self._entry(Path(path))
        arr = self._memo.get(key)
        if arr is None:
            arr = self._read_cached(target)
            if arr is None:
                arr = preprocess(read_image(path, window=self.spec.window,
                                                multiframe=self.spec.multiframe), self.spec)
                self.misses += 1
                self._write(target, arr)
            else:
                self.hits += 1
            return self._remember(key, arr)
        self.hits += 1
        return arr

    def prepare(self, paths: Iterable[str | Path], *, where: Sequence[str] | None = None,
                progress: bool = True) -> None:
        """Decode every path into the cache up front; report ALL unreadable files at once.

        ``where[k]`` says where ``paths[k]`` came from (e.g. ``"images.csv line 12, column
        'image'"``); without it a failure is named by its position (``image 3 of 40``).
        Raises one :class:`ImageError` listing up to 20 failures by ``where`` with reasons
        and the count, never a file name or path (those go to the debug log).
        """
        paths = [str(p) for p in paths]
        if where is not None and len(where) != len(paths):
            raise ValueError(f"where has {len(where)} entries for {len(paths)} paths")
        labels: dict[str | Path, str] = {}
        for k, p in enumerate(paths):
            labels.setdefault(p, where[k] if where is not None else f"image {k + 1} of {len(paths)}")
        unique = list(labels)
        failures: list[str] = []
        bar = tqdm(unique, desc="decoding images", unit="img", disable=not progress,
                   leave=False)
        for p in bar:
            try:
                key, target = self._entry(Path(p))
                if key not in self._memo and not target.is_file():
                    self.load(p)
            except ImageError as exc:
                log.debug("%s: %s: %s", labels[p], p, exc.reason)
                failures.append(f"{labels[p]}: {exc.reason}")
        if failures:
            shown = "\n  ".join(failures[:_LIST_MAX])
            extra = len(failures) - _LIST_MAX
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            raise ImageError(f"{len(failures)} of {len(unique)} images could not be read:\n  "
                             f"{shown}{more}")

    def __repr__(self) -> str:
        return (f"ImageCache(dir={str(self.dir)!r}, hits={self.hits}, misses={self.misses}, "
                f"memo={len(self._memo)})")
