"""Load the policy model and its tokenizer with `from_pretrained`.

Real checkpoints (Qwen3, Qwen3-MoE, any causal LM) load from a hub id or a local
directory; the models this tool builds itself (`build.py`) are written out as ordinary
Hugging Face directories, so they go through the very same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from gspo_cli.config import on_cpu_by_default
from gspo_cli.models import logprob_head
from gspo_cli.models.kernels import experts
from gspo_cli.models.kernels.rms_norm import fuse_rms_norms
from gspo_cli.models.lora import base_model_path, is_adapter_dir, load_adapters
from gspo_cli.models.routing import is_moe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of `model.dtype`."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer set up for batched generation: left padding and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
    experts_implementation: str = "auto", fused_rms_norm: Optional[bool] = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """Load a causal LM with `from_pretrained` (hub id or local directory); MoE models run
    their experts with `experts_implementation` (see `kernels.experts.choose`), and with
    `fused_rms_norm` the RMSNorms run as one autograd node each (`kernels.rms_norm`). Both
    CPU kernels are on by default on the CPU only (`auto`, None): elsewhere the model runs
    transformers' own code unless asked.

    A directory of `peft` adapters (a LoRA run's `checkpoints/final/`) loads as its base model
    with the adapters merged in: the same function, hence the same outputs, at no extra cost."""
    if is_adapter_dir(path):
        base = load_model(base_model_path(path), dtype, device, trust_remote_code, experts_implementation,
                          fused_rms_norm, gradient_checkpointing)
        return load_adapters(base, path, trainable=False).merge_and_unload()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return prepare_model(model, device, experts_implementation, fused_rms_norm, gradient_checkpointing).to(device)


def build_empty_model(
    path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
    experts_implementation: str = "auto", fused_rms_norm: Optional[bool] = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The model `load_model` returns for the same arguments, built from the checkpoint's config
    alone with every parameter and buffer on the meta device: no memory, no weights read. Its
    generation config is the checkpoint's, as `from_pretrained` reads it (`checkpoint_generation_config`).

    FSDP2 shards this skeleton, materialises each rank's shard, and receives the weights that
    rank 0 read (`train.sharded_loading`). `device` only chooses the CPU kernels, as in `load_model`."""
    if is_adapter_dir(path):  # merged adapters have the base model's structure
        path = base_model_path(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if model.can_generate():
        model.generation_config = checkpoint_generation_config(path, model.generation_config)
    return prepare_model(model, device, experts_implementation, fused_rms_norm, gradient_checkpointing)


def checkpoint_generation_config(path: str | Path, from_config: GenerationConfig) -> GenerationConfig:
    """The checkpoint's generation_config.json (a local directory or a hub id), as `from_pretrained`
    reads it; `from_config` (the one made from config.json) when there is none.

    The two differ where it matters: Qwen3's chat checkpoints end a turn at `<|im_end|>`, listed
    in generation_config.json's `eos_token_id` but not in config.json's. A model built with
    `from_config` alone stops only at `<|endoftext|>`, and `save_pretrained` writes that shorter
    list into the trained model."""
    try:
        return GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json: from_pretrained falls back to config.json as well
        return from_config


def prepare_model(model: PreTrainedModel, device: str, experts_implementation: str,
                  fused_rms_norm: Optional[bool], gradient_checkpointing: bool) -> PreTrainedModel:
    """The kernels, log-probability head and checkpointing `load_model` sets up (module structure
    only: the same on a loaded model and on a meta-device skeleton)."""
    implementation = experts.choose(experts_implementation, device)
    if implementation is not None and is_moe(model) and hasattr(model, "set_experts_implementation"):
        if implementation == experts.NAME and not experts.REGISTERED:
            raise ValueError(f"model.experts_implementation={experts.NAME} needs transformers >= 5")
        model.set_experts_implementation(implementation)
    if on_cpu_by_default(fused_rms_norm, device):
        fuse_rms_norms(model)
    logprob_head.install(model)  # the plain projection until a scoring pass asks for log-probabilities
    if gradient_checkpointing:  # transformers' own: layer activations recomputed in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
