"""FedBN at the site (real ClientApp): under ``federation.bn: local`` the site trains with its own
BatchNorm, keeps it between rounds and never uploads it; under ``average`` it is sent like any weight."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedmed.client.app import app
from fedmed.client.local_state import LOCAL_STATE_KEY
from fedmed.config import load_config
from fedmed.messages import JOB_KEY, encode_job
from fedmed.models import local_keys
from fedmed.server.federation import _local_keys, job_for_sites
from fedmed.task import model_from_config
from fedmed.transfer import pack, unpack


def _message(kind: str, content: RecordDict) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(metadata=md, content=content)


@pytest.mark.parametrize("bn", ["local", "average"])
def test_site_keeps_its_batchnorm_only_when_local(synth_config, synth_root, tmp_path, bn):
    from fedmed.client import site as site_mod

    _, path = synth_config(model={"variant": "image", "backbone": "test_efficientnet", "dp_compatible": False},
                           train={"max_steps_per_epoch": 3},
                           federation={"bn": bn, "rounds": 2, "local_epochs": 1})
    cfg = load_config(path)
    model = model_from_config(cfg)
    keys = local_keys(model, "local")
    assert keys and _local_keys(cfg) == (keys if bn == "local" else [])
    state = model.state_dict()
    arrays = pack(state)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_a", "data_dir": str(synth_root / "hospital_a"),
                                         "state_dir": str(tmp_path / "state")}))
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(),
                  run_config={})
    config = ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), "lr": 1e-3, "server-round": 1})
    reply = app(_message("train", RecordDict({"arrays": arrays, "config": config})), ctx)
    assert not reply.has_error(), reply.error
    sent = unpack(reply.content["arrays"], state)
    running = [k for k in keys if k.endswith("running_mean")]
    others = [k for k in state if k not in keys and state[k].is_floating_point()]
    assert any(not np.array_equal(sent[k], state[k].numpy()) for k in others)  # it did train
    if bn == "local":
        for k in keys:  # exactly what the server sent: nothing of the site's own BatchNorm leaves
            assert np.array_equal(sent[k], state[k].numpy()), k
        own = unpack(ctx.state[LOCAL_STATE_KEY], {k: state[k] for k in keys})
        assert any(not np.array_equal(own[k], state[k].numpy()) for k in running)  # the site's own statistics
    else:
        assert LOCAL_STATE_KEY not in ctx.state
        assert any(not np.array_equal(sent[k], state[k].numpy()) for k in running)  # uploaded like the rest

    # Round 2: the server's BatchNorm differs; a local site evaluates with its own instead.
    shifted = {k: (v + 7.0 if k.endswith("running_mean") else v) for k, v in state.items()}
    config["server-round"] = 2
    reply = app(_message("evaluate", RecordDict({"arrays": pack(shifted), "config": config})), ctx)
    assert not reply.has_error(), reply.error
    (rt,) = site_mod._CACHE.values()
    used = rt.model.state_dict()
    for k in running:
        if bn == "local":
            np.testing.assert_array_equal(used[k].numpy(), own[k])
        else:
            torch.testing.assert_close(used[k], shifted[k])


def test_local_batchnorm_needs_batchnorm(synth_config):
    _, path = synth_config(model={"variant": "image"}, federation={"bn": "local"})  # small_cnn: GroupNorm
    with pytest.raises(ValueError, match="no trainable BatchNorm"):
        _local_keys(load_config(path))
