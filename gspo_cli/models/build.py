"""Models the tool builds itself: a small random Qwen3(-MoE) with a character-level tokenizer.

They are written out with `save_pretrained` into the cache (`built_model_dir`), then
loaded with `from_pretrained` like any real checkpoint (`loading.py`).
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from gspo_cli.config import ModelConfig, TinyModelSpec
from gspo_cli.models.storage import config_hash, write_dir_atomically

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
# Printable ASCII without the control whitespace: enough for prompts of small tasks.
CHARSET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
TOKENIZER_VERSION = 1  # bump when the built tokenizer changes, to invalidate caches


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
