"""Distributed setup on PyTorch's own stack: torchrun's environment, DDP, FSDP2, collectives.

One process per device, launched by torchrun (`torch.distributed.run`). Every rank runs the
same loop on its shard of the prompts; the helpers here keep the math independent of the
world size: sums are all-reduced, and losses are normalised by global counts.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes files and builds shared caches."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistEnv:
    """Join the process group torchrun set up (`RANK`, `WORLD_SIZE`, ...); a no-op for one process.

    gloo on CPU, NCCL on CUDA; each CUDA rank takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shard(items: Sequence[T], env: DistEnv) -> list[T]:
    """This rank's contiguous share of `items` (whose length must divide by the world size)."""
    if len(items) % env.world_size:
        raise ValueError(f"{len(items)} items do not split evenly across {env.world_size} ranks")
    per_rank = len(items) // env.world_size
    return list(items[env.rank * per_rank:(env.rank + 1) * per_rank])


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `value` over ranks (a new tensor; `value` itself is left alone)."""
    if not env.distributed:
        return value
    total = value.detach().to(env.device, copy=True)  # NCCL reduces GPU tensors only
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise maximum of `value` over ranks (a new tensor)."""
    if not env.distributed:
        return value
    top = value.detach().to(env.device, copy=True)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top.to(value.device)


def all_gather_rows(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's `value` ([n, ...], the same n on each) concatenated in rank order: [world·n, ...]."""
    if not env.distributed:
        return value
    local = value.detach().to(env.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(value.device)


def all_reduce_any(flag: bool, env: DistEnv) -> bool:
    """Whether `flag` is true on any rank (keeps loops of collective forwards in lockstep)."""
    if not env.distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)]), env).item() > 0)


def check_shared_run_dir(run_dir: Path, env: DistEnv) -> None:
    """Stop every rank with one clear error unless all of them see rank 0's run directory.

    Several nodes must write one run: rank 0 writes the logs and the final model, every rank
    its checkpoint shards, and a resume reads them all back. Rank 0 writes a random token into
    the run directory; each rank reads it back after a barrier (a node on its own disk, or
    with another timestamped `hydra.run.dir`, does not find it).
    """
    if not env.distributed:
        return
    marker = Path(run_dir) / ".shared-run-dir"
    token = [secrets.token_hex(8) if env.is_main else None]
    if env.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    dist.barrier()
    sees = marker.exists() and marker.read_text() == token[0]
    missing = all_reduce_sum(torch.tensor([0.0 if sees else 1.0]), env).item()
    if missing:
        raise RuntimeError(
            f"{int(missing)} of {env.world_size} ranks do not see rank 0's run directory {run_dir} "
            f"(this rank {'does' if sees else 'does not'}): several nodes need it on a shared file system "
            f"and the same hydra.run.dir on every node (a timestamped default differs between nodes)")


def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.distributed:
        dist.barrier()


def wrap_model(model: torch.nn.Module, strategy: str, env: DistEnv, precision: str = "fp32") -> torch.nn.Module:
    """DDP, or FSDP2 `fully_shard` on every decoder layer and then the root.

    With one process the model is returned as is. FSDP2 with `precision="bf16"` computes in
    bf16 and keeps fp32 parameters and gradient reductions (its mixed-precision policy).
    """
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        return shard_with_fsdp(model, precision)
    raise ValueError(f"hardware.strategy={strategy!r} is not one of ['ddp', 'fsdp']")


def shard_with_fsdp(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
    """FSDP2 `fully_shard` on every decoder layer, then on the root (in place; returns `model`).

    A model on the meta device stays there: `to_empty` then materialises each rank's shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    # the decoder layers of the Hugging Face model (under `peft`: the model its wrapper holds)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in inner.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 (`fully_shard` makes it an `FSDPModule`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def micro_batch_sync(model: torch.nn.Module, last: bool, fsdp_unsharded: bool = False):
    """The context for one micro-batch's forward *and* backward pass: whether its gradients are
    reduced across ranks now or only accumulated locally.

    DDP: reduced on the mini-batch's last micro-batch only (`no_sync` must cover the forward
    too: DDP decides in the forward whether the next backward all-reduces). FSDP2: reduce-
    scattered after every micro-batch, so a rank holds its shard's gradient and never the full
    one, unless `fsdp_unsharded` (`hardware.fsdp_unsharded_accumulation`) trades that memory
    for one reduce-scatter per mini-batch.
    """
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if fsdp_unsharded and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module, enabled: bool = True):
    """Inside, FSDP2 all-gathers each layer's parameters once and keeps them gathered;
    on leaving, every layer is resharded for the update.

    Decoding runs one forward pass per token; FSDP2 reshards a layer after each forward, so
    without this every decoded token all-gathers every layer again (for a 30B model about
    60 GB moved per token). The cost: each rank holds the full parameters (in FSDP2's
    `param_dtype`) while it generates, as an inference engine would. DDP, one process and
    `enabled=False` (`hardware.gather_for_rollout`): nothing changes.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not enabled or not sharded:
        yield
        return
    layers = [m for m in sharded if m is not model]  # the root keeps FSDP2's own setting (it never reshards after forward)
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        for module in sharded:
            module.reshard()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying model of a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


def shutdown(env: DistEnv, finished: bool = False) -> None:
    """Leave the process group; `finished`: after a successful run, whose models the caller has
    already released.

    A DDP reducer (or FSDP2 state) that outlives `destroy_process_group` holds the last reference
    to the gloo group, and its release then runs the group's destructor, which joins the group's
    worker threads while holding the GIL that a worker needs to free its last tensors: a deadlock
    after a finished run (seen in CI). So a finished run collects its cycles and the ranks meet
    before the group goes; after a failure no rank waits for the others.
    """
    if not (env.distributed and dist.is_initialized()):
        return
    if finished:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()
