"""What a site keeps to itself between rounds: its own BatchNorm under ``federation.bn: local``.

FedBN: the site trains with its own BatchNorm weights and statistics and never uploads them.
They live in the SuperNode's ``context.state`` (kept by Flower between rounds, never sent);
the reply carries, for those keys, the very values the server sent, so it reveals nothing
about them and averaging leaves them unchanged. Which keys: :func:`fedmed.models.local_keys`.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context
from torch import nn

from fedmed.models import local_keys
from fedmed.transfer import pack, unpack

__all__ = ["LOCAL_STATE_KEY", "keep_local", "restore_local"]

LOCAL_STATE_KEY = "fedmed.local-bn"


def restore_local(model: nn.Module, context: Context, *, mode: str) -> int:
    """Overlay this site's own local tensors (from an earlier round) on the global model just
    loaded; returns how many. Nothing is stored before the site's first training round."""
    keys = local_keys(model, mode)
    if not keys or LOCAL_STATE_KEY not in context.state:
        return 0
    mine = {k: v for k, v in model.state_dict().items() if k in keys}
    own = unpack(context.state.array_records[LOCAL_STATE_KEY], mine)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in own.items()}, strict=False)
    return len(own)


def keep_local(model: nn.Module, context: Context, *, mode: str, received: ArrayRecord) -> int:
    """After local training: save the local tensors in ``context.state``, then put the server's
    values for them back into ``model`` so that what is uploaded next holds none of the site's."""
    keys = local_keys(model, mode)
    if not keys:
        return 0
    state = model.state_dict()
    context.state[LOCAL_STATE_KEY] = pack({k: state[k] for k in keys})
    sent = unpack(received, state)
    model.load_state_dict({k: torch.from_numpy(sent[k]) for k in keys}, strict=False)
    return len(keys)
