"""Secure aggregation by pairwise masking: the server learns only the sum of site updates.

Flower 1.41 ships SecAgg+ only for its legacy workflow, so fedmed builds the masking on
the Message API (Bonawitz et al. 2017, without the dropout-recovery stage):

1. each sampled site makes an ephemeral X25519 key pair per round and sends its public key;
2. the server relays every public key; site *i* derives with each peer *j* a shared seed
   (X25519 + HKDF-SHA256) and adds ``+PRG(seed)`` for ``j > i`` and ``-PRG(seed)`` for
   ``j < i`` to its fixed-point, example-weighted update (arithmetic mod 2**64);
3. the masks cancel in the server's sum, which divided by the total weight is FedAvg.

One masked update alone is uniformly random to the server. Without the recovery stage, a
site that drops between steps 1 and 3 leaves masks uncancelled: the round is then skipped
(the global model is kept) and the federation goes on with the next round.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SCALE_BITS", "generate_keypair", "mask_update", "unmask_sum"]

SCALE_BITS = 20  # fixed point: 2**-20 ≈ 1e-6 resolution on (weight × parameter)


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private, public)."""
    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            key.public_key().public_bytes(raw, serialization.PublicFormat.Raw))


def _shared_seed(private: bytes, peer_public: bytes, *, round_id: int) -> int:
    secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=f"fedmed-secagg-round-{round_id}".encode()).derive(secret)
    return int.from_bytes(key, "little")


def _prg(seed: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [rng.integers(0, 2**64, size=s, dtype=np.uint64, endpoint=False) for s in shapes]


def _encode(x: np.ndarray) -> np.ndarray:
    q = np.rint(np.asarray(x, dtype=np.float64) * (1 << SCALE_BITS)).astype(np.int64)
    return q.view(np.uint64)


def mask_update(
    arrays: dict[str, np.ndarray],
    *,
    weight: float,
    self_id: int,
    private: bytes,
    peers: dict[int, bytes],
    round_id: int,
) -> dict[str, np.ndarray]:
    """``weight × arrays`` in fixed point plus pairwise masks (uint64, wraps mod 2**64)."""
    names = list(arrays)
    shapes = [tuple(np.shape(arrays[n])) for n in names]
    out = [_encode(np.asarray(arrays[n]) * weight) for n in names]
    with np.errstate(over="ignore"):
        for peer, public in peers.items():
            if peer == self_id:
                continue
            masks = _prg(_shared_seed(private, public, round_id=round_id), shapes)
            for k, m in enumerate(masks):
                out[k] = out[k] + m if self_id < peer else out[k] - m
    return dict(zip(names, out))


def unmask_sum(updates: list[dict[str, np.ndarray]], *, total_weight: float,
               dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Sum masked updates (the masks cancel) and divide by the total weight: FedAvg."""
    if not updates:
        raise ValueError("no updates to aggregate")
    out: dict[str, np.ndarray] = {}
    with np.errstate(over="ignore"):
        for name in updates[0]:
            acc = np.zeros_like(updates[0][name], dtype=np.uint64)
            for u in updates:
                acc = acc + np.asarray(u[name], dtype=np.uint64)
            value = acc.view(np.int64).astype(np.float64) / (1 << SCALE_BITS) / total_weight
            out[name] = value.astype(dtypes.get(name, np.float32))
    return out


def fingerprint(public: bytes) -> str:
    """Short, loggable name of a public key (never the key itself)."""
    return hashlib.sha256(public).hexdigest()[:12]
