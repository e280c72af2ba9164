"""The model FLARE's server persists and its clients train: fedmed's model for the job.

FLARE's recipe builds the model from ``{"path": class, "args": {...}}`` on the server, so the
job's settings are the constructor's arguments; the wrapped module is fedmed's own.
"""

from __future__ import annotations

import torch
from fedmedpeer.task import Net, load_config
from torch import nn


class FedmedNet(nn.Module):
    def __init__(self, *, fedmed_config: str, cohort: str, rounds: int, local_epochs: int, image_size: int) -> None:
        super().__init__()
        self.cfg = load_config(fedmed_config, cohort, rounds=rounds, local_epochs=local_epochs, image_size=image_size)
        self.net = Net(self.cfg)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.net(**inputs)
