"""FSDP2 models whose checkpoint only rank 0 reads (`hardware.load_from_rank0`).

Loading a checkpoint on every rank costs every rank the whole model in host memory at once:
8 ranks of a node each holding Qwen3-30B-A3B's 61 GB of bf16 weights is 490 GB before the
first shard exists. Here rank 0 alone reads it (`load_full`); every rank builds the same
model on the meta device (`build_empty`: no memory), FSDP2 shards the skeleton, each rank
materialises only its shard, and PyTorch's distributed state-dict API broadcasts rank 0's
tensors one at a time, every rank keeping its slice (`broadcast_from_rank0`). The peak on the
other ranks is their shard plus the largest single tensor. Buffers, which FSDP2 does not
shard (rotary frequencies, non-persistent and so absent from any state dict), are broadcast
whole from rank 0's model.
"""

from __future__ import annotations

import gc
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from gspo_cli.train.distributed import DistEnv, shard_with_fsdp


def load_sharded_from_rank0(load_full: Callable[[], nn.Module], build_empty: Callable[[], nn.Module],
                            env: DistEnv, precision: str = "fp32") -> nn.Module:
    """An FSDP2-sharded model holding the weights `load_full` reads on rank 0 only.

    `load_full` and `build_empty` must give the same module structure (names, shapes, dtypes,
    which parameters train); `build_empty` runs on every rank, `load_full` on rank 0 alone.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full: Optional[nn.Module] = load_full() if env.is_main else None
    model = shard_with_fsdp(build_empty(), precision)
    model.to_empty(device=env.device)  # this rank's shards, uninitialised until the broadcast
    full_state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if full is not None:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, src=0)
    del full, full_state
    gc.collect()  # rank 0's full copy goes before training allocates anything
    return model
