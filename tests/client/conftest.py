"""What the tests of a site's ClientApp handlers share: a quick config, a site's context, a job message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmed.config import load_config
from fedmed.messages import CONFIG_KEY, JOB_KEY, encode_job
from fedmed.server.federation import job_for_sites
from fedmed.task import model_from_config
from fedmed.transfer import pack


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps replies with the current task's identity, which its runtimes set for a real message."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def cfg(synth_config):
    _, path = synth_config(train={"max_steps_per_epoch": 2})
    return load_config(path)


def _site_context(site_dir: Path, work: Path, allow: list[str] | None = None) -> Context:
    """A node's context with its site YAML in ``work``: the default policy's messages plus ``allow``."""
    path = work / "site.yaml"
    policy = {"allowed_messages": ["train", "evaluate", *(allow or [])]}
    path.write_text(yaml.safe_dump({"site": site_dir.name, "data_dir": str(site_dir), "device": "cpu",
                                    "state_dir": str(work), "policy": policy}))
    return Context(run_id=1, node_id=1, node_config={"site-config": str(path), "audit-log": str(work / "audit.jsonl")},
                   state=RecordDict(), run_config={})


def _job_message(cfg, kind: str, weights: dict[str, np.ndarray] | None = None, **config: Any) -> Message:
    """A coordinator's message of type ``kind``: the job, ``config`` and the weights (a fresh model's by default)."""
    weights = weights or {k: v.numpy() for k, v in model_from_config(cfg).state_dict().items()}
    content = RecordDict({"arrays": pack(weights),
                          CONFIG_KEY: ConfigRecord({JOB_KEY: encode_job(job_for_sites(cfg)), **config})})
    return Message(content=content, message_type=kind, dst_node_id=1)


@pytest.fixture
def site_context():
    """:func:`_site_context` as a fixture (tests do not import conftest)."""
    return _site_context


@pytest.fixture
def job_message():
    """:func:`_job_message` as a fixture."""
    return _job_message
