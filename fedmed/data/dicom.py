"""Read one DICOM file into a float image in [0, 1].

The steps follow the DICOM display pipeline (PS3.4 N.2): decode one frame, modality LUT
(rescale slope/intercept), VOI LUT or window, MONOCHROME1 inversion. Colour data is returned
as RGB. Every failure is a :class:`DicomError` that says what is wrong; messages never carry
element values (they may hold patient data), nor the file's name or path (names are often
built from patient ids): the file is on :attr:`DicomError.path` for the site's own log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    convert_color_space,
    get_decoder,
)

__all__ = ["DicomError", "read_dicom", "apply_window"]

_YBR_TO_CONVERT = ("YBR_FULL", "YBR_FULL_422")
_MONO = ("MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    """A DICOM file cannot be turned into an image; the message says why, ``path`` which."""

    def __init__(self, reason: str, *, path: str | Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else str(path)


def _scrub(text: str, path: Path) -> str:
    """A library's error text without the file's path or name (pydicom sometimes adds them)."""
    for s in (str(path), str(path.absolute()), path.name, path.stem):
        if s:
            text = text.replace(s, "<file>")
    return text


def apply_window(
    arr: np.ndarray, window: tuple[float, float], *, function: str = "LINEAR"
) -> np.ndarray:
    """Map values through a VOI window ``(center, width)`` (PS3.3 C.11.2.1.2) onto [0, 1].

    ``LINEAR`` is the DICOM default (center - 0.5, width - 1), ``LINEAR_EXACT`` the plain
    linear ramp, ``SIGMOID`` the logistic curve. Widths below the minimum are clamped.
    """
    x = np.asarray(arr, dtype=np.float64)
    center, width = float(window[0]), float(window[1])
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        width = max(float(width), 1e-6)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, max(float(width) - 1.0, 1e-6)
    else:
        width = max(float(width), 1e-6)
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def _read(path: Path) -> pydicom.Dataset:
    if not path.is_file():
        raise DicomError("file not found", path=path)
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no 'DICM' file header)", path=path) from None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise DicomError(
            f"not a readable DICOM file (truncated or corrupt: {type(exc).__name__})", path=path
        ) from None


def _decode_frame(ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, str]:
    """Decode the middle frame; returns the array and its actual photometric interpretation."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("no pixel data (not an image object)", path=path)
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise DicomError("no transfer syntax in the file meta header", path=path)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomError(
            f"pixel data could not be decoded (no decoder for transfer syntax {tsyntax.name})",
            path=path,
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DicomError(
            f"pixel data could not be decoded (transfer syntax {tsyntax.name} needs "
            f"a plugin: {needs})", path=path
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        arr, meta = decoder.as_array(ds, index=frames // 2, as_rgb=False)
    except Exception as exc:
        first = _scrub(" ".join(str(exc).split()), path)[:300]
        raise DicomError(
            f"pixel data could not be decoded (transfer syntax {tsyntax.name}: "
            f"{type(exc).__name__}{': ' + first if first else ''})", path=path
        ) from None
    return arr, str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))


def _to_rgb(arr: np.ndarray, pi: str, ds: pydicom.Dataset, path: Path) -> np.ndarray:
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif pi in _YBR_TO_CONVERT:
        arr = convert_color_space(arr, pi, "RGB")
    elif pi != "RGB" and not pi.startswith("YBR_"):
        # YBR_ICT / YBR_RCT / YBR_PARTIAL_* are converted by their codecs already.
        raise DicomError(f"unsupported photometric interpretation {pi!r}", path=path)
    if arr.dtype == np.uint8:
        top = 255.0
    elif pi == "PALETTE COLOR" or np.issubdtype(arr.dtype, np.floating):
        top = 65535.0 if arr.max() > 255 else 255.0
    else:
        top = float(2 ** int(ds.get("BitsStored") or 16) - 1)
    return arr.astype(np.float32) / top


def _normalise_gray(
    arr: np.ndarray, ds: pydicom.Dataset, window: tuple[float, float] | None
) -> np.ndarray:
    values = apply_modality_lut(arr, ds)
    if window is not None:
        return apply_window(values, window)
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        first, n = int(seq[0].LUTDescriptor[1]), int(seq[0].LUTDescriptor[0] or 2**16)
        lut = apply_voi(np.arange(first, first + n, dtype=np.int64), ds).astype(np.float64)
        out = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        w = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        return apply_window(values, (float(c), float(w)),
                            function=str(ds.get("VOILUTFunction") or "LINEAR"))
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def read_dicom(
    path: str | Path, *, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Read a DICOM file as float32 in [0, 1]: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB.

    Multi-frame files give their middle frame. Grayscale goes through the modality LUT, then
    ``window`` (center, width) if given, else the file's VOI LUT / window, else min-max;
    MONOCHROME1 is inverted so bright always means dense. A constant image gives zeros.
    Raises :class:`DicomError` (why; the file on ``.path``) for unreadable files, missing
    pixel data or pixel data that no installed plugin can decode.
    """
    path = Path(path)
    ds = _read(path)
    arr, pi = _decode_frame(ds, path)
    try:
        if pi in _MONO:
            if arr.ndim != 2:
                raise DicomError(f"{pi} pixel data has unexpected shape {arr.shape}", path=path)
            img = _normalise_gray(arr, ds, window)
            if pi == "MONOCHROME1":
                img = 1.0 - img
        else:
            img = _to_rgb(arr, pi, ds, path)
            if img.ndim != 3 or img.shape[-1] != 3:
                raise DicomError(f"{pi} pixel data has unexpected shape {arr.shape}", path=path)
    except DicomError:
        raise
    except Exception as exc:  # malformed LUTs, bad window values, ...
        raise DicomError(
            f"pixel values could not be converted ({type(exc).__name__})", path=path
        ) from None
    img = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(img, 0.0, 1.0)
