"""The server's calibration step against sites that answer, fail, stay silent or send junk.

Sites are played by a ``send`` function that answers each real Flower message the way
:func:`fedmed.client.app.calibration_fn` does (``nll_curve`` / ``measure`` on its own
logits, ``make_reply``); the end-to-end path through Flower is in tests/experiments/test_simulate.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from fedmed.calibration import (
    combine_measures,
    fit_temperature,
    fit_temperature_from_curves,
    measure,
    nll_curve,
    temperature_grid,
)
from fedmed.config import load_config
from fedmed.messages import make_reply
from fedmed.server.calibration import MESSAGE_TYPE, calibrate_federation, calibration_summary
from fedmed.server.federation import run_federation


def _logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An over-confident 3-class classifier (~70 % accurate, logits x 4)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1, (n, 3))
    z[np.arange(n), y] += 1.5
    return 4.0 * z, y


# node id -> (site, val logits/labels, test logits/labels)
SITES = {node: (name, *_logits(nv, 10 * node), *_logits(nt, 10 * node + 1))
         for node, name, nv, nt in ((1, "a", 200, 300), (2, "b", 80, 120), (3, "c", 60, 90),
                                    (4, "d", 50, 50), (5, "e", 50, 50))}
ARRAYS = {"w": np.zeros(3, dtype=np.float32)}


@pytest.fixture(autouse=True)
def in_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the current task's identity (its runtimes set it)."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _send(behaviour: dict[int, str], seen: list[Message] | None = None):
    def send(msgs: list[Message]) -> list[Message]:
        replies = []
        for msg in msgs:
            assert msg.metadata.message_type == MESSAGE_TYPE and "arrays" in msg.content  # the model, packed
            if seen is not None:
                seen.append(msg)
            node = msg.metadata.dst_node_id
            kind = behaviour.get(node, "ok")
            if kind == "silent":
                continue
            if kind == "error":
                replies.append(Message(Error(code=0, reason="site crashed"), reply_to=msg))
                continue
            cfg = msg.content["config"]
            name, zv, yv, zt, yt = SITES[node]
            if cfg["calibration"] == "fit":
                curve = nll_curve(zv, yv, np.asarray(cfg["temperatures"])).tolist()
                metrics = {"num-examples": len(yv), "nll_curve": curve[:5] if kind == "junk" else curve}
            else:
                metrics = measure(zt, yt, temperature=float(cfg["temperature"]))
            replies.append(make_reply(msg, site=name, metrics=metrics))
        return replies
    return send


def test_federated_fit_adds_curves_and_pools_bins() -> None:
    seen: list[Message] = []
    res = calibrate_federation(_send({}, seen), [1, 2, 3], method="federated", arrays=ARRAYS, job="{}")
    grid = temperature_grid()
    t = fit_temperature_from_curves([nll_curve(SITES[n][1], SITES[n][2], grid) for n in (1, 2, 3)], grid)
    assert res["temperature"] == t
    assert res["fit"] == {"on": "sites' val splits", "sites": ["a", "b", "c"], "num-examples": 340,
                          "sites_failed": {}}
    pooled_val = np.concatenate([SITES[n][1] for n in (1, 2, 3)]), np.concatenate([SITES[n][2] for n in (1, 2, 3)])
    assert t == pytest.approx(fit_temperature(*pooled_val), rel=grid[1] / grid[0] - 1)  # within one grid step
    expected = combine_measures({SITES[n][0]: measure(SITES[n][3], SITES[n][4], temperature=t) for n in (1, 2, 3)})
    assert res["pooled"]["num-examples"] == 510
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        assert res["pooled"][key] == pytest.approx(expected[key], rel=1e-12)
    assert res["pooled"]["ece_after"] < res["pooled"]["ece_before"] / 2  # over-confidence fixed
    assert res["sites_failed"] == {} and "central_test" not in res
    steps = [m.content["config"]["calibration"] for m in seen]
    assert steps == ["fit"] * 3 + ["measure"] * 3
    assert all(m.content["config"]["temperature"] == t for m in seen[3:])


def test_failed_silent_and_malformed_sites_are_listed_not_fatal() -> None:
    behaviour = {3: "junk", 4: "error", 5: "silent"}
    res = calibrate_federation(_send(behaviour), [1, 2, 3, 4, 5], method="federated", arrays=ARRAYS, job="{}")
    grid = temperature_grid()
    assert res["temperature"] == fit_temperature_from_curves(
        [nll_curve(SITES[n][1], SITES[n][2], grid) for n in (1, 2)], grid)
    assert res["fit"]["sites"] == ["a", "b"]
    assert res["fit"]["sites_failed"] == {"c": f"NLL curve has 5 points, the grid {len(grid)}",
                                          # an error text that is not a fedmed reason is withheld
                                          "node-4": "site failed (error text withheld: not a fedmed error reason)",
                                          "node-5": "no reply within the round timeout"}
    assert sorted(res["sites"]) == ["a", "b", "c"]  # c's test measurement is fine
    assert sorted(res["sites_failed"]) == ["node-4", "node-5"]
    summary = calibration_summary(res)
    assert "bins_before_count" not in summary["pooled"] and "bins_after_conf" not in summary["sites"]["a"]
    assert summary["pooled"]["ece_after"] == res["pooled"]["ece_after"]


def test_no_site_no_temperature() -> None:
    res = calibrate_federation(_send({}), [], method="federated", arrays=ARRAYS, job="{}")
    assert "temperature" not in res and "no validation examples" in res["error"]


def test_central_fit_and_central_test() -> None:
    zc, yc = _logits(400, 99)

    def central_logits(arrays: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
        assert arrays is ARRAYS
        return (zc[:200], yc[:200]) if split == "val" else (zc[200:], yc[200:])

    res = calibrate_federation(_send({}), [1, 2], method="central", arrays=ARRAYS, job="{}",
                               central_logits=central_logits)
    assert res["temperature"] == fit_temperature(zc[:200], yc[:200])
    assert res["fit"] == {"on": "central val split", "num-examples": 200}
    assert res["central_test"] == measure(zc[200:], yc[200:], temperature=res["temperature"])
    assert sorted(res["sites"]) == ["a", "b"]
    with pytest.raises(ValueError, match="central set"):
        calibrate_federation(_send({}), [1], method="central", arrays=ARRAYS, job="{}")


def test_central_calibration_without_a_central_set_fails_at_start(tmp_path: Path) -> None:
    cfg = load_config(raw={"data": {"classes": ["a", "b"]}},
                      overrides=["federation.calibration=central", "federation.central_test=c"])
    with pytest.raises(ValueError, match="held-out set"):
        run_federation(None, cfg, out_dir=tmp_path / "run")  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_curves_from_the_last_rounds_evaluation_replace_the_fit_exchange() -> None:
    grid = temperature_grid()
    curves = {SITES[n][0]: {"nll_curve": nll_curve(SITES[n][1], SITES[n][2], grid).tolist(),
                            "num-examples": len(SITES[n][2])} for n in (1, 2, 3)}
    seen: list[Message] = []
    res = calibrate_federation(_send({}, seen), [1, 2, 3], method="federated", arrays=ARRAYS, job="{}",
                               val_curves=curves)
    assert [m.content["config"]["calibration"] for m in seen] == ["measure"] * 3  # no fit exchange
    asked = calibrate_federation(_send({}), [1, 2, 3], method="federated", arrays=ARRAYS, job="{}")
    assert res["temperature"] == asked["temperature"] and res["pooled"] == asked["pooled"]
    assert res["fit"]["asked"] == "with the last round's evaluation" and "asked" not in asked["fit"]

    # a node whose curve is missing (it failed that evaluation): every node is asked again
    seen.clear()
    res = calibrate_federation(_send({}, seen), [1, 2, 3], method="federated", arrays=ARRAYS, job="{}",
                               val_curves={k: v for k, v in curves.items() if k != "c"})
    assert [m.content["config"]["calibration"] for m in seen] == ["fit"] * 3 + ["measure"] * 3
    assert res["temperature"] == asked["temperature"]
