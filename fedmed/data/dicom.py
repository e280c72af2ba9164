"""Read one DICOM file into a float image in [0, 1].

The steps follow the DICOM display pipeline (PS3.4 N.2): decode one frame, modality LUT
(rescale slope/intercept), VOI LUT or window, MONOCHROME1 inversion. Colour data is returned
as RGB. Every failure is a :class:`DicomError` that says what is wrong; messages never carry
element values (they may hold patient data), nor the file's name or path (names are often
built from patient ids): the file is on :attr:`DicomError.path` for the site's own log.
"""

from __future__ import annotations

import warnings
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
from pydicom.uid import AllTransferSyntaxes

from fedmed.errors import FedmedError

__all__ = ["DicomError", "read_dicom", "apply_window", "MULTIFRAME_POLICIES", "codec_report"]

MULTIFRAME_POLICIES = ("middle", "first", "refuse")
_YBR_TO_CONVERT = ("YBR_FULL", "YBR_FULL_422")
_MONO = ("MONOCHROME1", "MONOCHROME2")


class DicomError(FedmedError, ValueError):
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
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
        # pydicom reads a file cut short up to the cut and only warns; pixel data after the
        # cut is then silently absent, which would read as "not an image" below.
        if any("End of file reached" in str(w.message) for w in seen) and "PixelData" not in ds:
            raise DicomError("not a readable DICOM file (truncated: the file ends before its "
                             "pixel data)", path=path)
        return ds
    except DicomError:
        raise
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no 'DICM' file header)", path=path) from None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise DicomError(
            f"not a readable DICOM file (truncated or corrupt: {type(exc).__name__})", path=path
        ) from None


def _frame_count(ds: pydicom.Dataset, path: Path) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        raise DicomError("Number of Frames (0028,0008) is not a whole number", path=path) from None


def _frame_index(frames: int, multiframe: str, path: Path) -> int:
    if multiframe not in MULTIFRAME_POLICIES:
        raise ValueError(f"multiframe must be one of {MULTIFRAME_POLICIES}, got {multiframe!r}")
    if frames > 1 and multiframe == "refuse":
        raise DicomError(f"multi-frame image ({frames} frames) refused by data.multiframe=refuse "
                         "(use 'first' or 'middle' to read one frame)", path=path)
    return 0 if multiframe == "first" else frames // 2


def _decode_frame(ds: pydicom.Dataset, path: Path, multiframe: str) -> tuple[np.ndarray, str]:
    """Decode the frame ``multiframe`` picks; returns it and its actual photometric interpretation."""
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
    index = _frame_index(_frame_count(ds, path), multiframe, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # excess padding and similar notes
            # pydicom annotates **kwargs as DecodeOptions where it means Unpack[DecodeOptions]
            arr, meta = decoder.as_array(ds, index=index, as_rgb=False)  # type: ignore[arg-type]
    except Exception as exc:
        raise DicomError(f"pixel data could not be decoded (transfer syntax {tsyntax.name}: "
                         f"{_decode_reason(exc, tsyntax.is_compressed)})", path=path) from None
    return arr, str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))


def _decode_reason(exc: Exception, compressed: bool) -> str:
    """Why decoding failed, in fixed words: a plugin's own text can quote header elements."""
    text = str(exc)
    if not compressed:
        if "less than expected" in text:
            return "the pixel data is shorter than Rows x Columns x Bits Allocated needs (truncated?)"
        if "Missing required element" in text:
            return "an Image Pixel element (Rows, Columns, Bits Allocated, ...) is missing"
        return f"the Image Pixel elements do not describe the pixel data ({type(exc).__name__})"
    if "Unable to decode" in text:  # every installed plugin tried and refused the stream
        return ("the compressed stream is damaged or uses a variant no installed plugin "
                "(pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls, Pillow) decodes")
    return f"the compressed stream could not be decoded ({type(exc).__name__})"


def codec_report() -> dict[str, bool]:
    """Per compressed transfer syntax pydicom knows: whether an installed plugin decodes it."""
    out: dict[str, bool] = {}
    for ts in (t for t in AllTransferSyntaxes if t.is_compressed):
        try:
            out[ts.name] = bool(get_decoder(ts).is_available)
        except NotImplementedError:  # e.g. MPEG/HEVC video: no pixel decoder in pydicom
            out[ts.name] = False
    return out


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
    path: str | Path, *, window: tuple[float, float] | None = None, multiframe: str = "middle"
) -> np.ndarray:
    """Read a DICOM file as float32 in [0, 1]: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB.

    Multi-frame files give their middle frame (``multiframe="middle"``), their first
    (``"first"``), or are refused (``"refuse"``). Grayscale goes through the modality LUT, then
    ``window`` (center, width) if given, else the file's VOI LUT / window, else min-max;
    MONOCHROME1 is inverted so bright always means dense. A constant image gives zeros.
    Raises :class:`DicomError` (why; the file on ``.path``) for unreadable files, missing
    pixel data or pixel data that no installed plugin can decode.
    """
    path = Path(path)
    ds = _read(path)
    arr, pi = _decode_frame(ds, path, multiframe)
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
