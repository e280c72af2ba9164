"""Secure aggregation (Bonawitz et al., CCS 2017) with signed keys: the server learns only a sum.

Why hand-rolled protocol glue: Flower 1.42's SecAgg+ (``SecAggPlusWorkflow`` /
``secaggplus_mod``) runs only inside its legacy ``LegacyContext`` workflow and signs
nothing, so a server may swap in its own keys. fedmed drives rounds on the Message API
itself, so it implements the protocol's five steps here on well-kept primitives: X25519,
HKDF, AES-GCM, ChaCha20 and ECDSA from ``cryptography``, and Flower's Shamir helpers
(``flwr.common.secure_aggregation.crypto.shamir``, pycryptodome underneath).

Per round, with node ids as the sites' public indices:

1. **keys** — each site makes two fresh X25519 pairs (``enc`` for the shares, ``mask`` for
   the masks) and signs ``(federation, round, site name, node id, enc, mask, plan)`` with
   its authentication key (the ECDSA P-384 key ``fedmed site-key`` writes); ``plan`` is the
   server's hash of the round's model and settings (:func:`plan_hash`).
2. **share** — the server relays every signed key. Each site checks every peer's signature
   against the peer public keys in its *own* config (``secagg.peers_dir``), the round, the
   federation and its own entry, and that at least ``secagg.min_sites`` sites take part; it
   refuses the round otherwise (:class:`SecAggRefusal`). Only then it draws a self-mask
   seed ``b`` and Shamir-shares ``b`` and its ``mask`` private key among the peers
   (threshold ``t = max(1, n // 2)``), each share AES-GCM-encrypted to one peer.
3. **train** — the site checks the model and settings it got against the signed plan, then
   adds ``PRG(b)`` and, for every peer ``v`` that sent shares, ``±PRG(s_uv)`` (``s_uv`` from
   X25519 + HKDF) to its fixed-point, example-weighted update (mod 2**64). Masks derive only
   from keys verified in step 2.
4. **survivors** — the server names the sites whose masked update it received; each of
   them signs that list. 5. **unmask** — each site checks that *every* listed survivor signed
   the same list, then reveals (once per round) its shares of ``b`` for the survivors and of
   the ``mask`` key for the dropped; the server rebuilds those, removes the self-masks and
   the dropped sites' pairwise masks, and divides by the total weight: FedAvg.

What it stops: a server that substitutes or replays keys (signatures, checked at the site;
a key from an earlier attempt of the same round is signed, but no share "from" it opens, so
step 3 refuses), a server that sends sites different models or settings (the signed plan),
a server that claims a live site dropped (its self-mask stays), a server that shows
different survivor lists to different sites (the survivors' signatures). What it does not:
a server colluding with ``t`` sites (with 3 sites, one), a site that sends a bad update or
self-mask share (the sum is then wrong, not leaked), differences of sums across rounds. A
site that drops after it uploaded but before unmasking costs the round (the round is
skipped, the model kept).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedmed.messages import PublicRefusal

__all__ = ["SCALE_BITS", "SecAggRefusal", "SiteIdentity", "SiteSession", "threshold", "load_identity", "plan_hash",
           "check_reply_record", "rebuild_secret", "unmask_sum", "mask_update", "generate_keypair",
           "fingerprint"]

log = logging.getLogger("fedmed.secagg")

SCALE_BITS = 20  # fixed point: 2**-20 ≈ 1e-6 resolution on (weight × parameter)
_SIG = ec.ECDSA(hashes.SHA384())


class SecAggRefusal(PublicRefusal):
    """The site refuses this round's secure aggregation; the text is fixed words only."""

    def __init__(self, text: str) -> None:
        super().__init__(f"secure aggregation refused: {text}", kind="policy")


def threshold(n: int) -> int:
    """Shares needed to rebuild a site's secret among ``n`` sites (``n - 1`` hold shares)."""
    return max(1, n // 2)


# -- primitives --------------------------------------------------------------------------

def _statement(kind: str, *fields: bytes | str | int) -> bytes:
    """Unambiguous bytes to sign or bind: a domain tag and length-prefixed fields."""
    parts = [b"fedmed-secagg-v1", kind.encode()]
    parts += [f if isinstance(f, bytes) else str(f).encode() for f in fields]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private, public)."""
    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            key.public_key().public_bytes(raw, serialization.PublicFormat.Raw))


def _public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _pair_seed(private: bytes, peer_public: bytes, *, federation: str, round_id: int, a: int, b: int) -> bytes:
    return _agree(private, peer_public, _statement("mask", federation, round_id, min(a, b), max(a, b)))


def _prg(seed: bytes, sizes: list[int]) -> list[np.ndarray]:
    """ChaCha20 keystream as uint64 words: a cryptographic PRG (numpy's PCG64 is not one)."""
    total = sum(sizes)
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * total))
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return np.split(words, np.cumsum(sizes)[:-1]) if sizes else []


def _encode(x: np.ndarray) -> np.ndarray:
    q = np.rint(np.asarray(x, dtype=np.float64) * (1 << SCALE_BITS)).astype(np.int64)
    return q.view(np.uint64)


def _apply(out: dict[str, np.ndarray], seed: bytes, *, sign: int) -> None:
    """Add (``sign`` +1) or subtract (-1) ``PRG(seed)`` to every array, in sorted-name layout."""
    names = sorted(out)
    for name, m in zip(names, _prg(seed, [int(out[n].size) for n in names]), strict=True):
        m = m.reshape(out[name].shape)
        out[name] = out[name] + m if sign > 0 else out[name] - m


def mask_update(arrays: Mapping[str, np.ndarray], *, weight: float, self_mask: bytes,
                pair_seeds: Mapping[int, bytes], self_id: int) -> dict[str, np.ndarray]:
    """``weight × arrays`` in fixed point + ``PRG(self_mask)`` + ``±PRG(seed)`` per peer (mod 2**64).

    The lower node id of a pair adds the pair's mask, the higher subtracts it, so pairs cancel.
    """
    out = {k: _encode(np.asarray(v) * weight) for k, v in arrays.items()}
    with np.errstate(over="ignore"):
        _apply(out, self_mask, sign=+1)
        for peer, seed in pair_seeds.items():
            _apply(out, seed, sign=+1 if self_id < peer else -1)
    return out


def fingerprint(public: bytes) -> str:
    """Short, loggable name of a public key (never the key itself)."""
    import hashlib

    return hashlib.sha256(public).hexdigest()[:12]


PER_SITE_KEYS = frozenset({"secagg-stage", "secagg-u2", "secagg-from", "secagg-ciphertexts"})


def plan_hash(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> bytes:
    """SHA-256 of the global model and the training settings (less the per-site secagg keys).

    Every site signs it with its round key and checks the model it is sent against it, so
    the server must send all sites the same model and settings: it cannot, say, send the
    others ``lr=0`` (their updates then known) and read one site's update out of the sum.
    """
    import hashlib
    import json

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(_statement("array", name, a.dtype.str, ",".join(map(str, a.shape)), a.tobytes()))
    clean = {k: ([x.hex() if isinstance(x, bytes) else x for x in v] if isinstance(v, list)
                 else v.hex() if isinstance(v, bytes) else v) for k, v in config.items() if k not in PER_SITE_KEYS}
    h.update(_statement("config", json.dumps(clean, sort_keys=True)))
    return h.digest()


# -- who a site trusts ---------------------------------------------------------------------

@dataclass(frozen=True)
class SiteIdentity:
    """This site's name, its signing key and the peers' keys it trusts (from its own config)."""

    site: str
    signing_key: ec.EllipticCurvePrivateKey
    trusted: Mapping[str, ec.EllipticCurvePublicKey]
    min_sites: int = 2


def _load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    data = path.read_bytes()
    key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data
           else serialization.load_pem_private_key(data, None))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggRefusal("secagg.signing_key is not an EC key (make it with fedmed site-key)")
    return key


def _load_public(path: Path) -> ec.EllipticCurvePublicKey | None:
    data = path.read_bytes()
    try:
        key = (serialization.load_ssh_public_key(data) if data.startswith(b"ecdsa-")
               else serialization.load_pem_public_key(data))
    except ValueError:
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def load_identity(*, site: str, signing_key: str | None, peers_dir: str | None, min_sites: int = 2) -> SiteIdentity:
    """The site's identity from its config; refuses (fixed text) when a part is missing.

    ``peers_dir`` holds one ``<site>.pub`` per peer (what ``fedmed site-key`` writes), copied
    there by the hospital from the peers themselves — never taken from the coordinator.
    """
    if not signing_key or not Path(signing_key).is_file():
        raise SecAggRefusal("this site has no signing key (set secagg.signing_key or fedmed-client --auth-key)")
    if not peers_dir or not Path(peers_dir).is_dir():
        raise SecAggRefusal("this site has no trusted peer keys (set secagg.peers_dir)")
    trusted: dict[str, ec.EllipticCurvePublicKey] = {}
    for path in sorted(Path(peers_dir).glob("*.pub")):
        key = _load_public(path)
        if key is not None:
            trusted[path.stem] = key
    return SiteIdentity(site=site, signing_key=_load_private(Path(signing_key)), trusted=trusted,
                        min_sites=min_sites)


def _verify(key: ec.EllipticCurvePublicKey | None, signature: bytes, statement: bytes) -> bool:
    if key is None:
        return False
    try:
        key.verify(signature, statement, _SIG)
        return True
    except InvalidSignature:
        return False


# -- the site's side of one round ----------------------------------------------------------

class SiteSession:
    """One site's state through one round's five steps, kept in ``context.state``.

    ``state`` is a plain dict of ints/strings/bytes/lists (a Flower ConfigRecord's values).
    Every step checks the step before it happened for the same federation and round, so a
    server cannot skip the key checks, ask twice for shares, or mix rounds.
    """

    def __init__(self, identity: SiteIdentity, state: dict[str, Any], *, node_id: int) -> None:
        self.id, self.state, self.node = identity, state, int(node_id)

    def _refuse(self, detail: str, public: str) -> SecAggRefusal:
        """Wipe the round's secrets from the session, log the detail (it may name peers) here
        at the site; only ``public`` leaves. (Flower may keep the node's previous state when a
        handler raises: a refused step can then be asked again, but it never reveals more.)"""
        log.warning("secure aggregation refused in round %s: %s", self.state.get("round"), detail)
        self.state.clear()
        self.state["stage"] = "refused"
        return SecAggRefusal(public)

    def _expect(self, stage: str, *, federation: str, round_id: int) -> None:
        s = self.state
        if s.get("stage") != stage or s.get("federation") != federation or int(s.get("round", -1)) != round_id:
            raise self._refuse(f"step out of order (have {s.get('stage')!r} of round {s.get('round')}, "
                               f"expected {stage!r} of round {round_id})",
                               f"message out of order for round {round_id}")

    # step 1
    def advertise(self, *, federation: str, round_id: int, plan: bytes) -> dict[str, Any]:
        """Fresh round keys, signed together with the server's announced :func:`plan_hash`."""
        enc_sk, enc_pk = generate_keypair()
        mask_sk, mask_pk = generate_keypair()
        sig = self.id.signing_key.sign(_statement("keys", federation, round_id, self.id.site, self.node,
                                                  enc_pk, mask_pk, plan), _SIG)
        self.state.clear()
        self.state.update({"stage": "keys", "federation": federation, "round": round_id, "plan": plan,
                           "enc-private": enc_sk, "mask-private": mask_sk})
        return {"stage": "keys", "enc-key": enc_pk, "mask-key": mask_pk, "signature": sig}

    # step 2
    def share(self, roster: Mapping[str, list], *, federation: str, round_id: int) -> dict[str, Any]:
        """Verify every key of the roster, then send encrypted shares of ``b`` and the mask key."""
        self._expect("keys", federation=federation, round_id=round_id)
        nodes = [int(n) for n in roster["nodes"]]
        sites, encs, masks, sigs = (list(roster[k]) for k in ("sites", "enc-keys", "mask-keys", "signatures"))
        if not (len(nodes) == len(sites) == len(encs) == len(masks) == len(sigs)):
            raise self._refuse("roster fields differ in length", "malformed key list")
        if len(set(nodes)) != len(nodes) or len(set(sites)) != len(sites):
            raise self._refuse("a node id or site name repeats in the roster", "a site appears twice in the key list")
        if len(nodes) < self.id.min_sites:
            raise self._refuse(f"{len(nodes)} sites in the roster, secagg.min_sites is {self.id.min_sites}",
                          f"{len(nodes)} sites take part, fewer than secagg.min_sites {self.id.min_sites}")
        own = (_public_of(self.state["enc-private"]), _public_of(self.state["mask-private"]))
        for node, site, enc, mask, sig in zip(nodes, sites, encs, masks, sigs, strict=True):
            if node == self.node:
                if site != self.id.site or (enc, mask) != own:
                    raise self._refuse("the roster's entry for this site is not this site's key",
                                  "the key list misstates this site's own key")
                continue
            if not _verify(self.id.trusted.get(site), sig,
                           _statement("keys", federation, round_id, site, node, enc, mask, self.state["plan"])):
                why = "is not a trusted peer" if site not in self.id.trusted else "has no valid signature"
                raise self._refuse(f"the key of peer {site!r} (node {node}, key {fingerprint(mask)}) {why} "
                              f"for round {round_id}", "a peer key has no valid signature from a trusted site key")
        if self.node not in nodes:
            raise self._refuse("this site is not in the roster", "the key list leaves out this site")
        order = sorted(nodes)
        holders = [n for n in order if n != self.node]
        t = threshold(len(order))
        b = os.urandom(32)
        b_shares = create_shares(b, t, len(holders))
        sk_shares = create_shares(self.state["mask-private"], t, len(holders))
        enc_of = dict(zip(nodes, encs, strict=True))
        out = []
        for holder, bs, ks in zip(holders, b_shares, sk_shares, strict=True):
            key = _agree(self.state["enc-private"], enc_of[holder], _statement("share-key", federation, round_id))
            nonce = os.urandom(12)
            aad = _statement("share", federation, round_id, self.node, holder)
            out.append(nonce + AESGCM(key).encrypt(nonce, _statement("shares", bs, ks), aad))
        self.state.update({"stage": "share", "nodes": nodes, "sites": sites, "enc-keys": encs,
                           "mask-keys": masks, "self-mask": b})
        log.info("secure aggregation round %d: %d peer keys verified", round_id, len(holders))
        return {"stage": "share", "to": holders, "ciphertexts": out}

    # step 3, before training: check the server's list and open the shares
    def accept(self, *, u2: list[int], inbox: Mapping[int, bytes], plan: bytes, federation: str,
               round_id: int) -> None:
        """Check the model/settings against the signed plan and the masking list against the
        verified roster, and open the peers' shares; all before any training."""
        self._expect("share", federation=federation, round_id=round_id)
        if plan != self.state["plan"]:
            raise self._refuse("the model or settings sent for training differ from the plan the peers signed",
                               "the model or settings differ from the plan all sites signed")
        nodes = list(self.state["nodes"])
        u2 = sorted(int(n) for n in u2)
        if self.node not in u2 or not set(u2) <= set(nodes) or len(set(u2)) != len(u2):
            raise self._refuse("the masking list is not a subset of the verified roster", "bad masking list")
        if len(u2) < self.id.min_sites:
            raise self._refuse(f"{len(u2)} sites would mask together", f"{len(u2)} sites take part, fewer than "
                          f"secagg.min_sites {self.id.min_sites}")
        enc_of = dict(zip(nodes, self.state["enc-keys"], strict=True))
        share_of, b_sh, sk_sh = [], [], []
        for src in u2:
            if src == self.node:
                continue
            blob = inbox.get(src)
            key = _agree(self.state["enc-private"], enc_of[src], _statement("share-key", federation, round_id))
            try:
                if blob is None:  # refused below, as altered shares are
                    raise ValueError(f"no shares from node {src}")
                plain = AESGCM(key).decrypt(blob[:12], blob[12:],
                                            _statement("share", federation, round_id, src, self.node))
            except (InvalidTag, TypeError, ValueError):
                raise self._refuse(f"the shares from node {src} are missing or do not decrypt",
                              "a peer's shares are missing or altered") from None
            bs, ks = _split_fields(plain, "shares")
            share_of.append(src)
            b_sh.append(bs)
            sk_sh.append(ks)
        self.state.update({"stage": "accepted", "u2": u2, "share-of": share_of, "b-shares": b_sh,
                           "sk-shares": sk_sh})

    # step 3, after training
    def mask(self, arrays: Mapping[str, np.ndarray], *, weight: float, federation: str,
             round_id: int) -> dict[str, np.ndarray]:
        self._expect("accepted", federation=federation, round_id=round_id)
        mask_of = dict(zip(self.state["nodes"], self.state["mask-keys"], strict=True))
        seeds = {v: _pair_seed(self.state["mask-private"], mask_of[v], federation=federation, round_id=round_id,
                               a=self.node, b=v) for v in self.state["u2"] if v != self.node}
        self.state["stage"] = "masked"
        return mask_update(arrays, weight=weight, self_mask=self.state["self-mask"], pair_seeds=seeds,
                           self_id=self.node)

    # step 4
    def sign_survivors(self, u3: list[int], *, federation: str, round_id: int) -> dict[str, Any]:
        self._expect("masked", federation=federation, round_id=round_id)
        u3 = sorted(int(n) for n in u3)
        if self.node not in u3 or not set(u3) <= set(self.state["u2"]) or len(set(u3)) != len(u3):
            raise self._refuse("the survivor list is not a subset of the masking list", "bad survivor list")
        if len(u3) < self.id.min_sites:
            raise self._refuse(f"{len(u3)} survivors", f"{len(u3)} sites would be summed, fewer than "
                          f"secagg.min_sites {self.id.min_sites}")
        self.state.update({"stage": "survivors", "u3": u3})
        sig = self.id.signing_key.sign(_statement("survivors", federation, round_id, ",".join(map(str, u3))), _SIG)
        return {"stage": "survivors", "signature": sig}

    # step 5
    def unmask(self, *, signers: list[int], signatures: list[bytes], federation: str, round_id: int) -> dict[str, Any]:
        """Reveal shares once: ``b`` of each survivor, the mask key of each dropped site."""
        self._expect("survivors", federation=federation, round_id=round_id)
        u3 = list(self.state["u3"])
        site_of = dict(zip(self.state["nodes"], self.state["sites"], strict=True))
        statement = _statement("survivors", federation, round_id, ",".join(map(str, u3)))
        signed = {int(n) for n, s in zip(signers, signatures, strict=False)
                  if int(n) == self.node or _verify(self.id.trusted.get(site_of.get(int(n), "")), s, statement)}
        if not set(u3) <= signed:
            raise self._refuse(f"survivors {sorted(set(u3) - signed)} did not sign the same survivor list",
                          "not every survivor signed the same survivor list")
        self.state["stage"] = "done"  # never reveal a second time in this round
        dropped = set(self.state["u2"]) - set(u3)
        out: dict[str, Any] = {"stage": "unmask", "b-of": [], "b-shares": [], "sk-of": [], "sk-shares": []}
        for src, bs, ks in zip(self.state["share-of"], self.state["b-shares"], self.state["sk-shares"], strict=True):
            if src in u3:
                out["b-of"].append(src)
                out["b-shares"].append(bs)
            elif src in dropped:
                out["sk-of"].append(src)
                out["sk-shares"].append(ks)
        return out


def _split_fields(blob: bytes, kind: str) -> tuple[bytes, bytes]:
    """Inverse of ``_statement(kind, a, b)``."""
    parts, i = [], 0
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 4], "big")
        parts.append(blob[i + 4:i + 4 + n])
        i += 4 + n
    if len(parts) != 4 or parts[0] != b"fedmed-secagg-v1" or parts[1] != kind.encode():
        raise ValueError("malformed share")
    return parts[2], parts[3]


# -- what may leave a site (the guard asks) ------------------------------------------------

_REPLY_FIELDS: dict[str, dict[str, type]] = {
    "keys": {"enc-key": bytes, "mask-key": bytes, "signature": bytes},
    "share": {"to": int, "ciphertexts": bytes},
    "survivors": {"signature": bytes},
    "unmask": {"b-of": int, "b-shares": bytes, "sk-of": int, "sk-shares": bytes},
}


def check_reply_record(record: Mapping[str, Any]) -> str | None:
    """Why a reply's secure-aggregation record may not leave, or None: fixed fields per step,
    keys, signatures, node ids and encrypted or secret-shared random bytes only."""
    fields = _REPLY_FIELDS.get(str(record.get("stage")))
    if fields is None or set(record.keys()) != {"stage", *fields}:
        return "the secure-aggregation record holds unexpected fields"
    for key, kind in fields.items():
        value = record[key]
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            return f"secure-aggregation field {key!r} has the wrong type"
        if kind is bytes and any(len(v) > 4096 for v in values):
            return f"secure-aggregation field {key!r} is too long"
    for key in ("enc-key", "mask-key"):
        if key in record and len(record[key]) != 32:
            return "a secure-aggregation public key must be 32 bytes"
    return None


# -- the server's side ---------------------------------------------------------------------

def rebuild_secret(shares: list[bytes], *, n: int) -> bytes:
    """A site's secret from its peers' shares; ValueError when fewer than the threshold."""
    if len(shares) < threshold(n):
        raise ValueError(f"{len(shares)} shares, {threshold(n)} needed")
    return combine_shares(shares)


def unmask_sum(masked: Mapping[int, Mapping[str, np.ndarray]], *, self_masks: Mapping[int, bytes],
               dropped_keys: Mapping[int, bytes], mask_keys: Mapping[int, bytes], federation: str,
               round_id: int, total_weight: float, dtypes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Sum the survivors' masked updates, remove every self-mask and every pairwise mask with a
    dropped site (whose mask key was rebuilt), and divide by the total weight: FedAvg.

    ``mask_keys`` are the advertised public mask keys; a rebuilt key that does not match its
    public key raises ValueError (a bad share), so a wrong sum is never returned silently.
    """
    if not masked:
        raise ValueError("no updates to aggregate")
    if set(self_masks) != set(masked):
        raise ValueError("a survivor's self-mask seed is missing")
    first = next(iter(masked.values()))
    acc = {k: np.zeros(np.shape(v), dtype=np.uint64) for k, v in first.items()}
    with np.errstate(over="ignore"):
        for update in masked.values():
            for k in acc:
                acc[k] = acc[k] + np.asarray(update[k], dtype=np.uint64)
        for b in self_masks.values():
            _apply(acc, b, sign=-1)
        for u, sk in dropped_keys.items():
            if _public_of(sk) != mask_keys[u]:
                raise ValueError(f"the rebuilt mask key of node {u} does not match its public key")
            for v in masked:
                seed = _pair_seed(sk, mask_keys[v], federation=federation, round_id=round_id, a=u, b=v)
                _apply(acc, seed, sign=-1 if v < u else +1)  # v added the mask when v < u
    return {k: (a.view(np.int64).astype(np.float64) / (1 << SCALE_BITS) / total_weight).astype(
        dtypes.get(k, np.float32)) for k, a in acc.items()}
