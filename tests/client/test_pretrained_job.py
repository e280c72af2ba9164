"""The coordinator alone needs the weights file: sites get pretrained weights in the first global model."""

from __future__ import annotations

import time

import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedmed.client.app import app
from fedmed.config import load_config
from fedmed.messages import JOB_KEY, decode_job, encode_job
from fedmed.models import create_backbone
from fedmed.server.federation import job_for_sites
from fedmed.task import model_from_config, seed_everything
from fedmed.transfer import pack


def _message(kind: str, content: RecordDict) -> Message:
    md = Metadata(run_id=1, message_id=f"m{time.time_ns()}", src_node_id=0, dst_node_id=1,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(metadata=md, content=content)


def test_site_without_the_file_gets_the_pretrained_weights(synth_config, synth_root, tmp_path):
    from fedmed.client import site as site_mod

    seed_everything(123)
    source = create_backbone("small_cnn", in_chans=1)  # "pretrained": weights no random init repeats
    weights = tmp_path / "coordinator-only" / "hospital-weights.pth"
    weights.parent.mkdir()
    torch.save(source.state_dict(), weights)
    _, path = synth_config(model={"variant": "image", "pretrained_path": str(weights)})
    cfg = load_config(path)

    job = job_for_sites(cfg)
    encoded = encode_job(job)
    assert job["model"].get("pretrained_path") is None  # the job names no path
    assert decode_job(ConfigRecord({JOB_KEY: encoded}))["model"].get("pretrained_path") is None
    assert "hospital-weights" not in encoded and "coordinator-only" not in encoded

    global_model = model_from_config(cfg)  # what run_federation sends in round 1
    arrays = pack(global_model.state_dict())
    weights.unlink()  # the site cannot open it: it is not on the site's machine

    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({"site": "hospital_a", "data_dir": str(synth_root / "hospital_a"),
                                         "state_dir": str(tmp_path / "state")}))
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(),
                  run_config={})
    config = ConfigRecord({JOB_KEY: encoded, "server-round": 1})
    reply = app(_message("evaluate", RecordDict({"arrays": arrays, "config": config})), ctx)
    assert not reply.has_error(), reply.error
    (rt,) = site_mod._CACHE.values()
    assert rt.cfg.model.pretrained_path is None
    site_backbone = rt.model.image_branch.backbone.state_dict()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(site_backbone[k], v, rtol=0, atol=0, msg=k)
