"""train.optimizer: AdamW by default, SGD with momentum for DP-SGD."""

import torch
from torch import nn

from fedmed.config import TrainConfig
from fedmed.train.loop import make_optimizer


def test_sgd_uses_momentum_and_round_lr():
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.5, momentum=0.8), lr=0.25)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.25 and group["momentum"] == 0.8


def test_default_is_adamw():
    assert isinstance(make_optimizer(nn.Linear(3, 2), TrainConfig()), torch.optim.AdamW)
