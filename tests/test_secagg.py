"""Secure aggregation against a curious or hostile server (fedmed.secagg).

The protocol is driven in-process by a test "server" that may lie: it substitutes keys,
replays an old round's signed key, drops a site, shows different survivor lists. Honest
runs must give FedAvg; every attack must end in a refusal at the site, never in one site's
update in the server's hands. The last tests run the real ClientApp handlers and the real
round driver (``run_federation``) over an in-process grid.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedmed import secagg
from fedmed.certs import create_site_key
from fedmed.config import load_config
from fedmed.secagg import SecAggRefusal, SiteSession, load_identity, rebuild_secret, unmask_sum
from fedmed.server.checkpoint import load_state
from fedmed.task import model_from_config, seed_everything

NAMES = {17: "hospital_a", 4: "hospital_b", 230: "hospital_c"}
WEIGHTS = {17: 40.0, 4: 25.0, 230: 135.0}
FED, RND = "fed-1", 3
PLAN = b"\x07" * 32  # the server's hash of the round's model and settings
DT = {"w": np.float32, "b": np.float32}


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    """Each site's key pair as ``fedmed site-key`` writes it; the folder doubles as peers_dir."""
    d = tmp_path / "keys"
    for name in NAMES.values():
        create_site_key(d, site=name)
    return d


def _sessions(keys_dir: Path, *, min_sites: int = 2) -> dict[int, SiteSession]:
    return {n: SiteSession(load_identity(site=s, signing_key=str(keys_dir / s), peers_dir=str(keys_dir),
                                         min_sites=min_sites), {}, node_id=n) for n, s in NAMES.items()}


def _updates(seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {n: {"w": rng.normal(size=(64, 8)).astype(np.float32), "b": rng.normal(size=(8,)).astype(np.float32)}
            for n in NAMES}


def _fedavg(updates, nodes):
    total = sum(WEIGHTS[n] for n in nodes)
    return {k: sum(updates[n][k].astype(np.float64) * WEIGHTS[n] for n in nodes) / total for k in DT}


def _roster(adverts: dict[int, dict]) -> dict[str, list]:
    nodes = sorted(adverts)
    return {"nodes": nodes, "sites": [NAMES[n] for n in nodes], "enc-keys": [adverts[n]["enc-key"] for n in nodes],
            "mask-keys": [adverts[n]["mask-key"] for n in nodes],
            "signatures": [adverts[n]["signature"] for n in nodes]}


class Server:
    """The server's half of the protocol, written out so that a test can lie at any step."""

    def __init__(self, sessions: dict[int, SiteSession], rnd: int = RND) -> None:
        self.s, self.rnd = sessions, rnd
        self.adverts = {n: s.advertise(federation=FED, round_id=rnd, plan=PLAN) for n, s in sessions.items()}

    def share(self, roster_for=lambda n, roster: roster) -> dict[int, dict]:
        roster = _roster(self.adverts)
        self.shared = {n: s.share(roster_for(n, roster), federation=FED, round_id=self.rnd)
                       for n, s in self.s.items()}
        return self.shared

    def masked(self, updates, *, upload: set[int]) -> dict[int, dict[str, np.ndarray]]:
        u2 = sorted(self.shared)
        out = {}
        for n in u2:
            inbox = {src: rec["ciphertexts"][rec["to"].index(n)] for src, rec in self.shared.items() if src != n}
            self.s[n].accept(u2=u2, inbox=inbox, plan=PLAN, federation=FED, round_id=self.rnd)
            y = self.s[n].mask(updates[n], weight=WEIGHTS[n], federation=FED, round_id=self.rnd)
            if n in upload:  # the others "drop" after masking, before their upload arrives
                out[n] = y
        return out

    def unmask(self, masked, *, u3_for=None) -> dict[str, np.ndarray]:
        u3 = sorted(masked)
        views = {n: (u3_for(n) if u3_for else u3) for n in u3}
        sigs = {n: self.s[n].sign_survivors(views[n], federation=FED, round_id=self.rnd)["signature"] for n in u3}
        revealed = {n: self.s[n].unmask(signers=u3, signatures=[sigs[v] for v in u3], federation=FED,
                                        round_id=self.rnd) for n in u3}
        return self.sum(masked, revealed)

    def sum(self, masked, revealed) -> dict[str, np.ndarray]:
        b, sk = {}, {}
        for rec in revealed.values():
            for u, sh in zip(rec["b-of"], rec["b-shares"], strict=True):
                b.setdefault(u, []).append(sh)
            for u, sh in zip(rec["sk-of"], rec["sk-shares"], strict=True):
                sk.setdefault(u, []).append(sh)
        n = len(self.adverts)
        return unmask_sum(masked, self_masks={u: rebuild_secret(v, n=n) for u, v in b.items()},
                          dropped_keys={u: rebuild_secret(v, n=n) for u, v in sk.items()},
                          mask_keys={u: a["mask-key"] for u, a in self.adverts.items()}, federation=FED,
                          round_id=self.rnd, total_weight=sum(WEIGHTS[u] for u in masked), dtypes=DT)


def _close(got, want, atol=1e-5) -> None:
    for k in DT:
        np.testing.assert_allclose(got[k], want[k], atol=atol)


def test_masked_sum_is_fedavg(keys_dir):
    updates = _updates()
    server = Server(_sessions(keys_dir))
    server.share()
    masked = server.masked(updates, upload=set(NAMES))
    _close(server.unmask(masked), _fedavg(updates, NAMES))
    # One masked update alone is noise: its words look uniform over 64 bits.
    top = (masked[4]["w"] >> np.uint64(63)).mean()
    assert 0.35 < top < 0.65
    alone = masked[4]["w"].view(np.int64).astype(np.float64) / 2**20 / WEIGHTS[4]
    assert abs(np.corrcoef(alone.ravel(), updates[4]["w"].ravel())[0, 1]) < 0.2


def test_a_site_dropping_after_the_key_exchange_is_recovered(keys_dir):
    """hospital_c shares its secrets, then never uploads: the survivors' sum is still FedAvg."""
    updates = _updates(1)
    server = Server(_sessions(keys_dir))
    server.share()
    masked = server.masked(updates, upload={17, 4})
    # Without the recovery step the survivors' masks with hospital_c stay in the sum.
    broken = (sum(masked[n]["w"] for n in masked)).view(np.int64) / 2**20 / 65.0
    assert np.abs(broken - _fedavg(updates, [17, 4])["w"]).max() > 1e3
    _close(server.unmask(masked), _fedavg(updates, [17, 4]))


def _substitute(target: int, victim: int, *, resign: bool):
    """A hostile roster: the server's own X25519 keys in place of ``victim``'s, shown to ``target``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    enc_sk, enc_pk = secagg.generate_keypair()
    mask_sk, mask_pk = secagg.generate_keypair()
    server_ec = ec.generate_private_key(ec.SECP384R1())

    def roster_for(n, roster):
        if n != target:
            return roster
        r = {k: list(v) for k, v in roster.items()}
        i = r["nodes"].index(victim)
        r["enc-keys"][i], r["mask-keys"][i] = enc_pk, mask_pk
        if resign:  # signed with a key the server controls (not the victim's)
            r["signatures"][i] = server_ec.sign(secagg._statement("keys", FED, RND, NAMES[victim], victim, enc_pk,
                                                                  mask_pk, PLAN), secagg._SIG)
        return r

    return roster_for, (enc_sk, mask_sk)


@pytest.mark.parametrize("resign", [False, True], ids=["victim-signature", "server-signature"])
def test_a_substituted_key_is_refused(keys_dir, resign, caplog):
    sessions = _sessions(keys_dir)
    server = Server(sessions)
    roster_for, _ = _substitute(17, 4, resign=resign)
    with pytest.raises(SecAggRefusal, match="no valid signature") as err:
        server.share(roster_for)
    assert "hospital_b" not in str(err.value)           # the public text names no peer...
    assert "hospital_b" in caplog.text                  # ...the site's own log does
    with pytest.raises(SecAggRefusal, match="out of order"):  # and it never masks this round
        sessions[17].mask(_updates()[17], weight=1.0, federation=FED, round_id=RND)


def test_without_the_signature_check_the_substitution_unmasks_a_site(keys_dir, monkeypatch):
    """The attack is real: with verification switched off, the server swaps every peer key in
    hospital_a's view, opens the shares hospital_a sends "to them" and reads its update."""
    monkeypatch.setattr(secagg, "_verify", lambda *a: True)
    updates = _updates(2)
    sessions = _sessions(keys_dir)
    server = Server(sessions)
    fake = {}
    views = {17: _roster(server.adverts)}
    for victim in (4, 230):
        roster_for, fake[victim] = _substitute(17, victim, resign=False)
        views[17] = roster_for(17, views[17])
    out = sessions[17].share(views[17], federation=FED, round_id=RND)
    # hospital_a encrypted its shares of b and of its mask key to the server's keys.
    enc_a, mask_a = server.adverts[17]["enc-key"], server.adverts[17]["mask-key"]
    b_sh = []
    for holder, blob in zip(out["to"], out["ciphertexts"], strict=True):
        key = secagg._agree(fake[holder][0], enc_a, secagg._statement("share-key", FED, RND))
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], secagg._statement("share", FED, RND, 17, holder))
        b_sh.append(secagg._split_fields(plain, "shares")[0])
    b = rebuild_secret(b_sh, n=3)
    # hospital_a accepts a server-made inbox (shares "from" the fake peers) and masks.
    inbox = {}
    for holder in (4, 230):
        key = secagg._agree(fake[holder][0], enc_a, secagg._statement("share-key", FED, RND))
        nonce = os.urandom(12)
        inbox[holder] = nonce + AESGCM(key).encrypt(nonce, secagg._statement("shares", b"x", b"y"),
                                                    secagg._statement("share", FED, RND, holder, 17))
    sessions[17].accept(u2=[4, 17, 230], inbox=inbox, plan=PLAN, federation=FED, round_id=RND)
    y = sessions[17].mask(updates[17], weight=WEIGHTS[17], federation=FED, round_id=RND)
    acc = {k: y[k].copy() for k in DT}
    with np.errstate(over="ignore"):
        secagg._apply(acc, b, sign=-1)
        for victim in (4, 230):  # the pairwise masks with the fake peers, whose private keys it holds
            seed = secagg._pair_seed(fake[victim][1], mask_a, federation=FED, round_id=RND, a=17, b=victim)
            secagg._apply(acc, seed, sign=-1 if 17 < victim else +1)
    read = {k: acc[k].view(np.int64).astype(np.float64) / 2**20 / WEIGHTS[17] for k in DT}
    _close(read, updates[17])


def test_a_replayed_key_of_an_earlier_round_is_refused(keys_dir):
    sessions = _sessions(keys_dir)
    old = Server(sessions, rnd=RND)
    server = Server(sessions, rnd=RND + 1)

    def replay(n, roster):
        if n != 17:
            return roster
        r = {k: list(v) for k, v in roster.items()}
        i = r["nodes"].index(4)
        for field, key in (("enc-keys", "enc-key"), ("mask-keys", "mask-key"), ("signatures", "signature")):
            r[field][i] = old.adverts[4][key]
        return r

    with pytest.raises(SecAggRefusal, match="no valid signature"):
        server.share(replay)


def test_a_key_replayed_from_an_earlier_attempt_of_the_same_round_gets_no_update(keys_dir):
    """A resumed federation repeats a round, so an old attempt's key of hospital_b carries a
    valid signature for it. The server holds neither half of that key's encryption pair, so
    it cannot give hospital_a shares "from" it: hospital_a refuses before masking."""
    sessions = _sessions(keys_dir)
    first = Server(sessions)
    first.share()
    server = Server(sessions)  # the same federation, round and plan, asked again

    def replay(n, roster):
        if n != 17:
            return roster
        r = {k: list(v) for k, v in roster.items()}
        i = r["nodes"].index(4)
        for field, key in (("enc-keys", "enc-key"), ("mask-keys", "mask-key"), ("signatures", "signature")):
            r[field][i] = first.adverts[4][key]
        return r

    server.share(replay)  # the signature is valid for this round...
    stale = {src: rec["ciphertexts"][rec["to"].index(17)] for src, rec in first.shared.items() if src != 17}
    fresh = {src: rec["ciphertexts"][rec["to"].index(17)] for src, rec in server.shared.items() if src != 17}
    saved = dict(sessions[17].state)
    for inbox in ({**fresh, 4: stale[4]}, fresh):  # ...but no share "from" the old key opens
        sessions[17].state.clear()
        sessions[17].state.update(saved)
        with pytest.raises(SecAggRefusal, match="missing or altered"):
            sessions[17].accept(u2=sorted(NAMES), inbox=inbox, plan=PLAN, federation=FED, round_id=RND)
        assert sessions[17].state == {"stage": "refused"}  # the round's secrets are gone


def test_a_key_moved_to_another_node_or_site_is_refused(keys_dir):
    sessions = _sessions(keys_dir)
    server = Server(sessions)

    def swap_names(n, roster):  # hospital_b's signed key presented as hospital_c's, and back
        r = {k: list(v) for k, v in roster.items()}
        i, j = r["nodes"].index(4), r["nodes"].index(230)
        r["sites"][i], r["sites"][j] = r["sites"][j], r["sites"][i]
        return r

    with pytest.raises(SecAggRefusal, match="no valid signature"):
        server.share(swap_names)


def test_sites_promised_different_models_or_settings_refuse(keys_dir):
    """A server that gives one site another model or other settings (say lr=0 to all but one,
    to know their updates and read the last one out of the sum) is caught twice: by the
    peers, when the announced plans differ, and by the site, when what it gets is not the plan."""
    sessions = _sessions(keys_dir)
    adverts = {n: s.advertise(federation=FED, round_id=RND, plan=PLAN if n != 4 else b"\x08" * 32)
               for n, s in sessions.items()}
    with pytest.raises(SecAggRefusal, match="no valid signature"):
        sessions[17].share(_roster(adverts), federation=FED, round_id=RND)
    updates = _updates(5)
    server = Server(_sessions(keys_dir))
    server.share()
    inbox = {src: rec["ciphertexts"][rec["to"].index(4)] for src, rec in server.shared.items() if src != 4}
    with pytest.raises(SecAggRefusal, match="differ from the plan"):
        server.s[4].accept(u2=sorted(NAMES), inbox=inbox, plan=b"\x08" * 32, federation=FED, round_id=RND)
    with pytest.raises(SecAggRefusal, match="out of order"):
        server.s[4].mask(updates[4], weight=1.0, federation=FED, round_id=RND)
    arrays = {"w": np.ones((2, 2), np.float32)}
    assert secagg.plan_hash(arrays, {"lr": 1e-3}) != secagg.plan_hash(arrays, {"lr": 0.0})
    assert secagg.plan_hash(arrays, {"lr": 1e-3, "secagg-u2": [1]}) == secagg.plan_hash(arrays, {"lr": 1e-3})
    assert secagg.plan_hash(arrays, {}) != secagg.plan_hash({"w": np.zeros((2, 2), np.float32)}, {})


def test_an_unknown_site_or_too_few_sites_is_refused(keys_dir, tmp_path):
    other = tmp_path / "stranger"
    create_site_key(other, site="hospital_x")
    sessions = _sessions(keys_dir)
    stranger = SiteSession(load_identity(site="hospital_x", signing_key=str(other / "hospital_x"),
                                         peers_dir=str(keys_dir)), {}, node_id=99)
    names = {**NAMES, 99: "hospital_x"}
    adverts = {n: s.advertise(federation=FED, round_id=RND, plan=PLAN) for n, s in {**sessions, 99: stranger}.items()}
    roster = _roster({n: a for n, a in adverts.items() if n != 99})
    roster = {k: v + [adverts[99][{"enc-keys": "enc-key", "mask-keys": "mask-key",
                                   "signatures": "signature"}[k]]] if k not in ("nodes", "sites") else v
              for k, v in roster.items()}
    roster["nodes"], roster["sites"] = roster["nodes"] + [99], roster["sites"] + [names[99]]
    with pytest.raises(SecAggRefusal, match="no valid signature"):
        sessions[17].share(roster, federation=FED, round_id=RND)
    # A server that leaves a site alone with one peer cannot get below the site's floor.
    strict = _sessions(keys_dir, min_sites=3)
    adverts = {n: s.advertise(federation=FED, round_id=RND, plan=PLAN) for n, s in strict.items()}
    with pytest.raises(SecAggRefusal, match="min_sites"):
        strict[17].share(_roster({n: adverts[n] for n in (17, 4)}), federation=FED, round_id=RND)


def test_different_survivor_lists_are_refused_and_reveal_nothing(keys_dir):
    """The server tells hospital_a that hospital_c dropped and hospital_b that it survived, to
    get hospital_c's mask key from one and its self-mask seed from the other: both refuse."""
    updates = _updates(3)
    server = Server(_sessions(keys_dir))
    server.share()
    server.masked(updates, upload=set(NAMES))  # every site uploads: the round reaches unmasking
    views = {17: [17, 4], 4: [17, 4, 230], 230: [17, 4, 230]}
    sigs = {n: server.s[n].sign_survivors(views[n], federation=FED, round_id=RND)["signature"] for n in views}
    for n in (17, 4):
        with pytest.raises(SecAggRefusal, match="same survivor list"):
            server.s[n].unmask(signers=list(views), signatures=[sigs[v] for v in views], federation=FED,
                               round_id=RND)
    # ...and a refused site keeps refusing this round
    with pytest.raises(SecAggRefusal, match="out of order"):
        server.s[17].unmask(signers=[17, 4], signatures=[sigs[17], sigs[4]], federation=FED, round_id=RND)


def test_shares_are_revealed_once_per_round(keys_dir):
    updates = _updates(4)
    server = Server(_sessions(keys_dir))
    server.share()
    masked = server.masked(updates, upload=set(NAMES))
    server.unmask(masked)
    with pytest.raises(SecAggRefusal, match="out of order"):
        server.s[17].unmask(signers=[], signatures=[], federation=FED, round_id=RND)


def test_the_guard_allows_only_the_protocols_fields(keys_dir):
    s = _sessions(keys_dir)[17]
    rec = s.advertise(federation=FED, round_id=RND, plan=PLAN)
    assert secagg.check_reply_record(rec) is None
    assert secagg.check_reply_record({**rec, "note": "hospital_a/patient-17"}) is not None
    assert secagg.check_reply_record({**rec, "enc-key": b"x" * 31}) is not None
    assert secagg.check_reply_record({"stage": "share", "to": [1], "ciphertexts": ["text"]}) is not None


def test_config_refuses_secure_aggregation_with_a_non_sum_strategy(tmp_path):
    from fedmed.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  classes: [a, b]\nfederation:\n  strategy: fedmedian\n  secure_aggregation: true\n")
    with pytest.raises(ConfigError, match="secure_aggregation"):
        load_config(path)


@pytest.mark.slow
def test_secure_federation_equals_plain_fedavg(synth_config, tmp_path):
    """Same seeds, same sites: the securely aggregated global model is FedAvg's.

    Fixed-point encoding differs from float averaging by ~1e-6 per round; a second round of
    training can amplify that in a few weights, so the bound is on the mean and the max.
    """
    from fedmed.experiments.simulate import simulate

    states = {}
    for secure in (False, True):
        _, path = synth_config(federation={"rounds": 2, "local_epochs": 1, "evaluate_every": 2,
                                           "secure_aggregation": secure, "central_test": None})
        cfg = load_config(path)
        states[secure] = simulate(cfg, sites=None, out_dir=tmp_path / f"secure-{secure}")
    diffs = np.concatenate([np.abs(states[True].arrays[n] - p).ravel() for n, p in states[False].arrays.items()])
    assert diffs.mean() < 1e-5 and diffs.max() < 5e-3, (diffs.mean(), diffs.max())
    assert [r["sites_trained"] for r in states[True].history][-1]


@pytest.mark.parametrize("mode, cls", [("server-fixed", "DifferentialPrivacyServerSideFixedClipping"),
                                       ("server-adaptive", "DifferentialPrivacyServerSideAdaptiveClipping")])
def test_client_level_dp_wraps_the_strategy(mode, cls):
    from fedmed.config import FederationConfig
    from fedmed.server.strategies import make_strategy

    strategy = make_strategy(FederationConfig(strategy="fedavg", min_sites=3, client_dp=mode,
                                              client_dp_noise=0.05, client_dp_clip=2.0))
    assert type(strategy).__name__ == cls


# -- the real ClientApp handlers and round driver ------------------------------------------

class _Grid:
    """Grid push/pull delivering each message to the real ClientApp here; ``tamper`` plays
    the hostile server (it may rewrite a message, or return None: the site never answers)."""

    def __init__(self, contexts: dict[int, Context], tamper=None) -> None:
        from fedmed.client.app import app

        self.app, self.contexts, self.tamper, self.replies = app, contexts, tamper, {}
        self.log: list[tuple[int, str, Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            msg = self.tamper(msg) if self.tamper else msg
            if msg is None:
                continue
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as Flower's ClientApp runtime replies
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"),
                                reply_to=msg)
            self.log.append((msg.metadata.dst_node_id, msg.metadata.message_type, reply))
            self.replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


NODES = {9_000_000_000_000_000_001: "hospital_a", 77: "hospital_b", 4242: "hospital_c"}


def _contexts(synth_root: Path, tmp_path: Path, sites: dict[int, str], *, secure: bool) -> dict[int, Context]:
    keys = tmp_path / "site-keys"
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = {}
    for node, site in sites.items():
        if secure and not (keys / site).exists():
            create_site_key(keys, site=site)
        cfg = {"site": site, "data_dir": str(synth_root / site), "state_dir": str(tmp_path / "state" / site)}
        if secure:
            cfg["secagg"] = {"signing_key": str(keys / site), "peers_dir": str(keys)}
        path = tmp_path / f"{site}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out[node] = Context(run_id=1, node_id=node, node_config={"site-config": str(path), "audit-log": str(
            tmp_path / f"{site}-audit.jsonl")}, state=RecordDict(), run_config={})
    return out


@pytest.fixture
def server_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # set by Flower's runtimes for a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1)


def _run(synth_config, synth_root, tmp_path, sites, *, secure, tamper=None, name="run"):
    from fedmed.server.federation import run_federation

    _, path = synth_config(federation={"rounds": 1, "local_epochs": 1, "min_sites": 2, "fraction_evaluate": 0.0,
                                       "secure_aggregation": secure, "central_test": None, "calibration": "off",
                                       "round_timeout": 5},
                           train={"max_steps_per_epoch": 2})
    grid = _Grid(_contexts(synth_root, tmp_path / name, sites, secure=secure), tamper)
    grid.cfg = load_config(path)
    state = run_federation(grid, grid.cfg, out_dir=tmp_path / name / "out")
    return state, grid


def _zero_lr_for(node):
    def tamper(msg):
        if msg.metadata.dst_node_id == node and msg.metadata.message_type == "train":
            msg.content["config"]["lr"] = 0.0
        return msg
    return tamper


def _max_diff(a, b) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if a[k].dtype.kind == "f")


def test_secure_round_through_the_clientapp_equals_fedavg_and_survives_a_drop(synth_config, synth_root, tmp_path,
                                                                             server_identity):
    """Real handlers, real round driver: FedAvg within fixed-point tolerance; then hospital_c
    stops answering after the key exchange and the round aggregates the other two."""
    secure, grid = _run(synth_config, synth_root, tmp_path, NODES, secure=True, name="secure")
    plain, _ = _run(synth_config, synth_root, tmp_path, NODES, secure=False, name="plain")
    assert sorted(secure.history[-1]["sites_trained"]) == ["hospital_a", "hospital_b", "hospital_c"]
    assert _max_diff(secure.arrays, plain.arrays) < 1e-5
    audit = [json.loads(line) for line in (tmp_path / "secure" / "hospital_b-audit.jsonl").read_text().splitlines()]
    assert [a["secagg"]["stage"] for a in audit if "secagg" in a] == ["keys", "share", "survivors", "unmask"]
    train_replies = [r for _, kind, r in grid.log if kind == "train"]
    assert all(r.content["arrays"][k].dtype == "uint64" for r in train_replies for k in r.content["arrays"].keys())

    c_node = 4242

    def drop_c(msg):
        return None if msg.metadata.dst_node_id == c_node and msg.metadata.message_type == "train" else msg

    dropped, _ = _run(synth_config, synth_root, tmp_path, NODES, secure=True, tamper=drop_c, name="drop")
    two = {n: s for n, s in NODES.items() if n != c_node}
    plain2, _ = _run(synth_config, synth_root, tmp_path, two, secure=False, name="plain2")
    assert sorted(dropped.history[-1]["sites_trained"]) == ["hospital_a", "hospital_b"]
    print(f"secure vs FedAvg: {_max_diff(secure.arrays, plain.arrays):.2e}; with a drop vs FedAvg of the "
          f"survivors: {_max_diff(dropped.arrays, plain2.arrays):.2e}; vs FedAvg of all three: "
          f"{_max_diff(dropped.arrays, plain.arrays):.2e}")
    assert _max_diff(dropped.arrays, plain2.arrays) < 1e-5
    assert _max_diff(dropped.arrays, plain.arrays) > 5e-4  # the two answers are far apart


def test_hostile_server_substituting_a_key_gets_a_refusal(synth_config, synth_root, tmp_path, server_identity):
    """The server puts its own keys in hospital_a's view of hospital_b: hospital_a refuses
    before reading data and sends no update; the others aggregate without it."""
    a_node, b_node = 9_000_000_000_000_000_001, 77
    _, mask_pk = secagg.generate_keypair()

    def substitute(msg):
        config = msg.content["config"]
        if msg.metadata.dst_node_id == a_node and config.get("secagg-stage") == "share":
            keys = list(config["secagg-mask-keys"])
            keys[list(config["secagg-nodes"]).index(b_node)] = mask_pk
            config["secagg-mask-keys"] = keys
        return msg

    state, grid = _run(synth_config, synth_root, tmp_path, NODES, secure=True, tamper=substitute, name="hostile")
    a_replies = [(kind, r) for node, kind, r in grid.log if node == a_node]
    assert [k for k, r in a_replies if r.has_error()] == ["query"]  # refused at the share step
    assert not any(kind == "train" for kind, _ in a_replies)         # never asked to, never sent an update
    refused = [r for _, r in a_replies if r.has_error()][0]
    assert "no valid signature" in refused.error.reason and "hospital_b" not in refused.error.reason
    row = state.history[-1]
    assert sorted(row["sites_trained"]) == ["hospital_b", "hospital_c"]
    assert "no valid signature" in row["sites_rejected"]["hospital_a"]  # the report names the refusal
    plain, _ = _run(synth_config, synth_root, tmp_path, {n: s for n, s in NODES.items() if n != a_node},
                    secure=False, name="plain-bc")
    print(f"hostile round vs FedAvg of hospital_b and hospital_c: {_max_diff(state.arrays, plain.arrays):.2e}")
    assert _max_diff(state.arrays, plain.arrays) < 1e-5


@pytest.mark.slow
def test_secure_aggregation_in_a_tls_deployment_signs_with_the_site_keys(synth_config, synth_root, cache_dir,
                                                                       tmp_path):
    """Real SuperLink and SuperNodes over TLS with node authentication: the sites sign their
    round keys with the ``--auth-key`` they join with and check each other's against the
    ``.pub`` files in their own ``secagg.peers_dir``; only masked updates leave them."""
    import subprocess
    import sys

    from fedmed.certs import create_certificates
    from fedmed.flower import free_port

    bin_dir = Path(sys.executable).parent
    sites = ["hospital_a", "hospital_b", "hospital_c"]
    certs = create_certificates(tmp_path / "certs", hosts=["127.0.0.1"])
    keys = {s: create_site_key(tmp_path / "keys", site=s) for s in sites}
    peers = tmp_path / "peers"  # what each hospital received from the others, not from the server
    peers.mkdir()
    for s in sites:
        (peers / f"{s}.pub").write_bytes(keys[s][1].read_bytes())
    _, cfg_path = synth_config(federation={"rounds": 1, "secure_aggregation": True, "fraction_evaluate": 0.0,
                                           "calibration": "off", "central_test": None},
                               train={"max_steps_per_epoch": 2})
    out, port = tmp_path / "run", free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDMED_CACHE_DIR=str(cache_dir))
    server = subprocess.Popen(
        [str(bin_dir / "fedmed-server"), "-c", str(cfg_path), "--host", "127.0.0.1", "--port", str(port),
         "--out", str(out), "--ssl-ca-certfile", str(certs["ca_cert"]), "--ssl-certfile", str(certs["cert"]),
         "--ssl-keyfile", str(certs["key"]), *[a for s in sites for a in ("--auth-key", str(keys[s][1]))]],
        env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    procs = [subprocess.Popen(
        [str(bin_dir / "fedmed-client"), "--site", s, "--data-dir", str(synth_root / s), "--server",
         f"127.0.0.1:{port}", "--root-certificates", str(certs["ca_cert"]), "--auth-key", str(keys[s][0]),
         "--once", "--grace", "2", "--work-dir", str(tmp_path / "sites" / s), f"secagg.peers_dir={peers}",
         "secagg.required=true"],
        env=env, stdout=open(tmp_path / f"{s}.log", "w"), stderr=subprocess.STDOUT) for s in sites]
    try:
        assert server.wait(600) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for p in procs:
            assert p.wait(120) == 0
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
    row = load_state(out).history[-1]
    assert sorted(row["sites_trained"]) == sites, row
    for s in sites:
        audit = [json.loads(line) for line in (tmp_path / "sites" / s / "audit.jsonl").read_text().splitlines()]
        stages = [a["secagg"]["stage"] for a in audit if "secagg" in a]
        assert stages == ["keys", "share", "survivors", "unmask"], stages
        train = [a for a in audit if a["type"] == "train"]
        assert len(train) == 1 and {d for _, d in train[0]["arrays"].values()} == {"uint64"}


def test_hostile_server_sending_lr_zero_to_the_others_gets_refusals(synth_config, synth_root, tmp_path,
                                                                    server_identity):
    """The server sends hospital_b and hospital_c ``lr=0`` (their updates are then the model it
    sent) to read hospital_a's update out of the sum: both refuse before training, and
    hospital_a will not be unmasked alone."""
    a_node, b_node, c_node = 9_000_000_000_000_000_001, 77, 4242
    lr_zero = _zero_lr_for(b_node)

    def tamper(msg):
        return _zero_lr_for(c_node)(lr_zero(msg))

    state, grid = _run(synth_config, synth_root, tmp_path, NODES, secure=True, tamper=tamper, name="lr0")
    errors = {node: r.error.reason for node, kind, r in grid.log if kind == "train" and r.has_error()}
    assert set(errors) == {b_node, c_node}
    assert all("differ from the plan" in e for e in errors.values())
    assert state.history[-1]["sites_trained"] == []                    # round skipped, nothing unmasked
    seed_everything(grid.cfg.train.seed)  # the initial model, as run_federation makes it
    init = {k: v.numpy() for k, v in model_from_config(grid.cfg).state_dict().items()}
    assert _max_diff(state.arrays, init) == 0.0
    keys = tmp_path / "lr0" / "site-keys"
    session = SiteSession(load_identity(site="hospital_a", signing_key=str(keys / "hospital_a"),
                                        peers_dir=str(keys)),
                          dict(grid.contexts[a_node].state["secagg"]), node_id=a_node)
    with pytest.raises(SecAggRefusal, match="min_sites"):                # a server ignoring its own minimum
        session.sign_survivors([a_node], federation=session.state["federation"], round_id=1)
