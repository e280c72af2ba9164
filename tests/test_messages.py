"""Server-side screening of site updates: NaN/Inf, wrong shapes and failures are rejected by site."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedmed.messages import screen_train_replies


def _reply(site: str, arrays: dict[str, np.ndarray] | None, *, n: int = 10, error: str | None = None) -> Message:
    md = Metadata(run_id=1, message_id=f"r{time.time_ns()}", src_node_id=7, dst_node_id=0,
                  reply_to_message_id="q", group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    if error:
        return Message(metadata=md, error=Error(code=0, reason=error))
    content = RecordDict({"metrics": MetricRecord({"num-examples": n}), "site": ConfigRecord({"name": site})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    return Message(metadata=md, content=content)


REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.mark.parametrize("arrays, n, error, reason", [
    ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, 10, None, "NaN or Inf"),
    ({"w": np.full((2, 3), np.inf, np.float32), "b": np.zeros(3, np.float32)}, 10, None, "NaN or Inf"),
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, 10, None, "shape"),
    ({"w": np.zeros((2, 3), np.float32)}, 10, None, "parameter names"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, 0, None, "num-examples"),
    (None, 10, None, "lacks arrays"),
    (None, 10, "ClientApp raised: boom", "site failed"),
])
def test_bad_update_is_rejected_naming_the_site(arrays, n, error, reason, caplog):
    ref = ArrayRecord(array_dict={k: Array(v) for k, v in REF.items()})
    good = _reply("hospital_a", {k: v + 1 for k, v in REF.items()})
    bad = _reply("hospital_b", arrays, n=n, error=error)
    ok, rejected = screen_train_replies([good, bad], ref)
    assert ok == [good]
    assert len(rejected) == 1 and reason in rejected[0].reason
    if error is None:
        assert rejected[0].site == "hospital_b"
        assert "hospital_b" in caplog.text
