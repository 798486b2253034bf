"""The policy and the frozen KL reference, loaded as the run's hardware asks: whole on one
process or under DDP, and under FSDP2 read by rank 0 alone and sharded (`sharded_loading`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gspo_cli.config import TrainConfig
from gspo_cli.models.loading import build_empty_model, load_model
from gspo_cli.models.lora import add_adapters, load_adapters
from gspo_cli.train.distributed import DistEnv, wrap_model
from gspo_cli.train.sharded_loading import load_sharded_from_rank0


def shards_from_rank0(cfg: TrainConfig, env: DistEnv) -> bool:
    """Whether models load through `load_sharded_from_rank0` (FSDP2 with `hardware.load_from_rank0`)."""
    return env.distributed and cfg.hardware.strategy == "fsdp" and cfg.hardware.load_from_rank0


def load_policy(cfg: TrainConfig, start_path: str, saved_model: Optional[Path], env: DistEnv):
    """The policy to train, wrapped for the run's strategy (DDP, FSDP2, or as is in one process)."""
    if shards_from_rank0(cfg, env):
        return load_sharded_from_rank0(lambda: read_policy(cfg, start_path, saved_model, "cpu"),
                                       lambda: empty_policy(cfg, start_path, env.device), env, cfg.hardware.precision)
    return wrap_model(read_policy(cfg, start_path, saved_model, env.device), cfg.hardware.strategy, env,
                      cfg.hardware.precision)


def read_policy(cfg: TrainConfig, start_path: str, saved_model: Optional[Path], device: str):
    """The policy as read from disk: the starting model, or a checkpoint's; with `model.lora` the
    starting model under adapters, fresh or the checkpoint's (a LoRA checkpoint holds the adapters only)."""
    mc = cfg.model
    lora_on = mc.lora.rank > 0
    path = str(saved_model) if saved_model is not None and not lora_on else start_path
    policy = load_model(path, mc.dtype, device, mc.trust_remote_code, mc.experts_implementation,
                        mc.fused_rms_norm, mc.gradient_checkpointing)
    if not lora_on:
        return policy
    if saved_model is not None:
        return load_adapters(policy, saved_model, trainable=True)
    return add_adapters(policy, mc.lora, cfg.seed)


def empty_policy(cfg: TrainConfig, start_path: str, device: str):
    """`read_policy`'s module structure on the meta device (adapters included); `device` chooses
    the kernels, as in `load_model`."""
    mc = cfg.model
    model = build_empty_model(start_path, mc.dtype, device, mc.trust_remote_code, mc.experts_implementation,
                              mc.fused_rms_norm, mc.gradient_checkpointing)
    return add_adapters(model, mc.lora, cfg.seed) if mc.lora.rank > 0 else model


def load_reference(cfg: TrainConfig, start_path: str, env: DistEnv):
    """A frozen copy of the starting model for the KL penalty: whole on each rank, or under
    FSDP2 sharded like the policy."""
    mc = cfg.model
    kernels = (mc.trust_remote_code, mc.experts_implementation, mc.fused_rms_norm)
    if shards_from_rank0(cfg, env):
        reference = load_sharded_from_rank0(lambda: load_model(start_path, mc.dtype, "cpu", *kernels),
                                            lambda: build_empty_model(start_path, mc.dtype, env.device, *kernels),
                                            env, cfg.hardware.precision)
    else:
        reference = load_model(start_path, mc.dtype, env.device, *kernels)
    return reference.eval().requires_grad_(False)
