"""Build or load the policy model and its tokenizer.

Real checkpoints (Qwen3, Qwen3-MoE, any causal LM) load with `from_pretrained` from a hub
id or a local directory. The embedded default is a tiny Qwen3-MoE that the tool builds
itself, with a character-level tokenizer, and writes out as an ordinary Hugging Face
directory, so that it goes through the very same `from_pretrained` path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from gspo_cli import experts
from gspo_cli.config import ModelConfig, TinyModelSpec
from gspo_cli.moe import is_moe
from gspo_cli.norms import fuse_rms_norms

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
# Printable ASCII without the control whitespace: enough for prompts of small tasks.
CHARSET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
TOKENIZER_VERSION = 1  # bump when the built tokenizer changes, to invalidate caches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_char_tokenizer(vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character plus specials.

    Args:
        vocab_size: pad the vocabulary with `<|reserved_i|>` tokens up to this size (0: no
            padding). Text never encodes to them, but a random model samples them: with about
            a thousand tokens its end-of-sequence token is rarely drawn, so its responses run
            to full length (the throughput benchmark's workload, `model=bench-qwen3-moe`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    tokens = specials + CHARSET
    tokens += [f"<|reserved_{i}|>" for i in range(max(0, vocab_size - len(tokens)))]
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=1024,
    )


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised Qwen3-MoE (or dense Qwen3 when `spec.num_experts == 0`)."""
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if spec.num_experts > 0:
        config = Qwen3MoeConfig(
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.num_experts_per_tok,
            moe_intermediate_size=spec.moe_intermediate_size,
            norm_topk_prob=True,  # as in Qwen3-30B-A3B
            **common,
        )
        return Qwen3MoeForCausalLM(config)
    return Qwen3ForCausalLM(Qwen3Config(**common))


def config_hash(*parts: Any) -> str:
    """A short stable hash of configuration values (dataclasses, dicts, scalars)."""
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_dir_atomically(target: Path, write: Any) -> Path:
    """Call `write(tmp_dir)` and rename the result to `target`, so readers never see half a directory.

    Two processes racing to build the same cached directory both succeed; the loser's copy
    is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def built_model_dir(cfg: ModelConfig, cache_dir: Path) -> Path:
    """Directory of the built (untrained) tiny model, created on first use."""
    assert cfg.build is not None
    seed = cfg.warm_start.seed
    spec = dataclasses.asdict(cfg.build)
    if spec["vocab_size"] == 0:  # added later: left out at its default, so older caches stay valid
        del spec["vocab_size"]
    target = cache_dir / "models" / f"{cfg.name}-{config_hash(spec, seed, TOKENIZER_VERSION)}"
    if (target / "config.json").exists():
        return target

    def write(tmp: Path) -> None:
        tokenizer = build_char_tokenizer(cfg.build.vocab_size)
        build_tiny_model(cfg.build, tokenizer, seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(target, write)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer set up for batched generation: left padding and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
    experts_implementation: str = "auto", fused_rms_norm: bool = False,
) -> PreTrainedModel:
    """Load a causal LM with `from_pretrained` (hub id or local directory); MoE models run
    their experts with `experts_implementation` (see `gspo_cli.experts.choose`), and with
    `fused_rms_norm` the RMSNorms run as one autograd node each (`gspo_cli.norms`)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    implementation = experts.choose(experts_implementation, device)
    if implementation is not None and is_moe(model) and hasattr(model, "set_experts_implementation"):
        if implementation == experts.NAME and not experts.REGISTERED:
            raise ValueError(f"model.experts_implementation={experts.NAME} needs transformers >= 5")
        model.set_experts_implementation(implementation)
    if fused_rms_norm:
        fuse_rms_norms(model)
    return model.to(device)



def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
