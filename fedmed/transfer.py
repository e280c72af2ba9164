"""Model weights on the wire: one flat array per dtype, optionally in half precision.

Why not one Flower ``Array`` per tensor: Flower ships every Array (and its chunks) as a
separate object over HTTP, and the SuperNode/ServerApp poll for objects that have not
arrived yet with a backoff that starts at 1 s. The default fusion model has 92 tensors,
i.e. ~190 objects per message, and each message took 15–25 s on a loopback link. Packed,
a message is a handful of objects.

Flower's strategies aggregate element-wise (FedAvg/FedProx/FedAdam/FedYogi/FedMedian/
trimmed mean) or on the whole flattened update (Krum, DP clipping norms), so they give
the same result on the packed vectors as on the per-tensor arrays.

Both ends know the layout: the server's and the site's models are built from the same
job, so ``unpack`` takes the receiver's own state dict as the template (names, shapes,
dtypes, order) and refuses a record that does not fit it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["pack", "unpack", "widen", "nbytes", "HALF"]

HALF = np.dtype(np.float16)


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def pack(state: Mapping[str, Any], *, half: bool = False) -> ArrayRecord:
    """Flatten ``state`` (name → array/tensor) into one array per dtype, in ``state``'s order.

    ``half=True`` sends floating-point groups as float16 (half the bytes); the receiver
    restores the template's dtype in :func:`unpack`.
    """
    groups: dict[str, list[np.ndarray]] = {}
    for v in state.values():
        a = _numpy(v)
        groups.setdefault(a.dtype.name, []).append(a.reshape(-1))
    out: dict[str, Array] = {}
    for dtype, parts in groups.items():
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        if half and np.issubdtype(flat.dtype, np.floating):
            flat = flat.astype(HALF)
        out[dtype] = Array(np.ascontiguousarray(flat))
    return ArrayRecord(array_dict=out)


def unpack(record: ArrayRecord, template: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Split a packed record back into ``template``'s tensors (name → numpy array)."""
    shapes = {k: _numpy(v) for k, v in template.items()}
    want: dict[str, int] = {}
    for a in shapes.values():
        want[a.dtype.name] = want.get(a.dtype.name, 0) + a.size
    flats = {k: a.numpy() for k, a in record.items()}
    if set(flats) != set(want) or any(flats[k].size != n for k, n in want.items()):
        got = {k: int(v.size) for k, v in list(flats.items())[:4]}
        more = f" (+{len(flats) - 4} more arrays)" if len(flats) > 4 else ""
        raise ValueError(f"model weights do not fit this model: got {got}{more} values per dtype, expected {want} "
                         "(is the other side running the same model config?)")
    offsets = dict.fromkeys(want, 0)
    out: dict[str, np.ndarray] = {}
    for name, ref in shapes.items():
        key = ref.dtype.name
        start = offsets[key]
        offsets[key] = start + ref.size
        out[name] = flats[key][start:start + ref.size].astype(ref.dtype, copy=False).reshape(ref.shape).copy()
    return out


def widen(record: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """A half-precision reply back in the reference's dtypes (shape mismatches are left for screening)."""
    out: dict[str, Array] = {}
    changed = False
    for k, a in record.items():
        ref = reference.get(k)
        arr = a.numpy()
        if ref is not None and arr.dtype == HALF and ref.numpy().dtype != HALF and arr.shape == tuple(ref.shape):
            arr, changed = arr.astype(ref.numpy().dtype), True
        out[k] = Array(np.ascontiguousarray(arr))
    return ArrayRecord(array_dict=out) if changed else record


def nbytes(state: Mapping[str, Any]) -> int:
    """Bytes of the weights themselves (the denominator of the network benchmark)."""
    return int(sum(_numpy(v).nbytes for v in state.values()))
