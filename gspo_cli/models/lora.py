"""LoRA adapters through `peft`: RL of a model whose full optimizer state does not fit.

With `model.lora.rank` > 0 the policy is the loaded model wrapped by `peft.get_peft_model`:
low-rank adapters on the attention projections (`target_modules`) and on the fused expert
weights of an MoE (`target_parameters`, one adapter per expert), everything else frozen. Only
the adapters (and the routers, with `train_router`) reach the optimizer, so AdamW's state is a
few MB instead of twice the model.

The KL reference is the same model with the adapters switched off (`AdaptersOff`), so no
second copy is loaded. Checkpoints and `checkpoints/final/` hold the adapters in `peft`'s own
format (`adapter_config.json`, `adapter_model.safetensors`); `merge_into_base` folds them into
the base weights and writes an ordinary Hugging Face model (`gspo export`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from gspo_cli.config import LoraAdapterConfig

ADAPTER_CONFIG = "adapter_config.json"  # what `PeftModel.save_pretrained` writes next to the weights
ROUTER_MODULE = "gate"  # Qwen3-MoE's router: `mlp.gate` (a `TopKRouter`)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a directory holds `peft` adapters rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_model_path(adapter_dir: str | Path) -> str:
    """The model the adapters were trained on, as `peft` recorded it (a directory or hub id)."""
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` (or the model a DDP wrapper holds) is a `peft` model."""
    return isinstance(getattr(model, "module", model), PeftModel)


def present_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """The entries of `names` that end the name of some parameter of `model` (as `peft` matches them)."""
    params = [n for n, _ in model.named_parameters()]
    return [name for name in names if any(p == name or p.endswith("." + name) for p in params)]


def lora_config(cfg: LoraAdapterConfig, model: nn.Module) -> LoraConfig:
    """`peft`'s config for `cfg` on this model: expert weights it lacks (a dense model) are left out."""
    if cfg.rank <= 0:
        raise ValueError(f"model.lora.rank={cfg.rank}: LoRA needs a rank of at least 1")
    targets = present_parameters(model, list(cfg.target_parameters))
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or None,
        target_parameters=targets or None,
        # a trainable copy of each router; `disable_adapter()` switches back to the frozen original
        modules_to_save=[ROUTER_MODULE] if cfg.train_router else None,
        bias="none",
    )


def add_adapters(model: nn.Module, cfg: LoraAdapterConfig, seed: int) -> PeftModel:
    """Wrap `model` with fresh adapters (B = 0, so the adapted model starts equal to the base).

    A's random initialisation is drawn from `seed` in a forked generator: every process of a
    run starts from the same adapters (FSDP2 does not broadcast them) and the run's own random
    streams are left as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(cfg, model))


def load_adapters(model: nn.Module, adapter_dir: str | Path, trainable: bool) -> PeftModel:
    """Wrap `model` with adapters saved by `save_pretrained` (a checkpoint, `checkpoints/final/`)."""
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates: all of a plain model, the adapters (and routers) of a `peft` one."""
    return [p for p in model.parameters() if p.requires_grad]


class AdaptersOff:
    """The KL reference of a LoRA run: the policy itself, called with its adapters switched off.

    It stands where a frozen reference model would (`reference_logprobs`): calling it runs the
    policy's forward inside `disable_adapter()`, i.e. the base weights, and the base routers when
    the routers train. `module` is the policy so that `response_logprobs`, which looks for the
    output projection on a wrapper's `module` (as on DDP's), finds the chunked log-probability head.
    """

    def __init__(self, policy: PeftModel) -> None:
        self.module = policy

    def __call__(self, **forward: Any):
        with self.module.disable_adapter():
            return self.module(**forward)


def merge_into_base(adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write base model + adapters, merged, as an ordinary Hugging Face model (and its tokenizer).

    The base is loaded from where the adapters say they were trained (`base_model_path`) with
    plain `from_pretrained`, so the merged files carry no trace of this tool's CPU kernels.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_model_path(adapter_dir), dtype=dtype)
    merged = load_adapters(base, adapter_dir, trainable=False).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer_from = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_model_path(adapter_dir)
    AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(out_dir)
    return Path(out_dir)
