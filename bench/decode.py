"""Decode throughput of the rollout engines against the hardware's limit (part of `make gpu-check`).

Decoding one token for R rows reads every weight once and each row's KV cache so far, and
does little arithmetic per byte: its time is bounded below by the bytes moved over the
memory bandwidth. So the limit on generated tokens/s is

    R × bandwidth / (weight bytes + R × mean context × KV bytes per token),

with the bandwidth measured by a device-to-device copy (bytes read + written per second) and
the mean context the prompt plus half the response. Each engine generates the same rows
(`prompts`, max_new_tokens each, sampled at temperature 1) from the same model, and its
tokens/s is set against that limit:

- `builtin`: this project's sampler (`gspo_cli/rollout/generate.py`);
- `continuous`: transformers' continuous batching (`gspo_cli/rollout/continuous.py`);
- `generate`: `model.generate()`, transformers' default path (what TRL uses without vLLM).

The model is a copy in the compute dtype (bf16 on a GPU), as a serving engine would hold it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of keys and values one token adds to the cache, all layers together."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def decode_limit(weight_bytes: float, kv_per_token: float, rows: int, mean_context: float,
                 bandwidth: float) -> float:
    """Generated tokens/s when every decode step only moves its bytes at `bandwidth` (bytes/s):
    the weights once and `rows` caches of `mean_context` tokens."""
    step_bytes = weight_bytes + rows * mean_context * kv_per_token
    return rows * bandwidth / step_bytes


def measure_copy_bandwidth(device: str, mebibytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s a device-to-device copy moves (read + write), the best of `repeats`."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    source = torch.empty(mebibytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def generate_with_transformers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                               generator: torch.Generator) -> torch.Tensor:
    """`model.generate()` sampling at temperature 1, nothing truncated: [N] response lengths."""
    from gspo_cli.rollout.generate import encode_prompts, stop_token_ids

    ids, mask = encode_prompts(tokenizer, prompts, str(next(model.parameters()).device))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=1.0, top_k=0, top_p=1.0, eos_token_id=stop_token_ids(model, tokenizer),
                         pad_token_id=tokenizer.pad_token_id)
    response = out[:, ids.shape[1]:]
    return (response != tokenizer.pad_token_id).sum(1)


def engines(model, tokenizer, max_new_tokens: int) -> dict[str, Callable[[list[str], torch.Generator], torch.Tensor]]:
    """name -> (prompts, generator) -> [N] response lengths."""
    from gspo_cli.rollout.engines import sample_rollout

    def ours(engine: str):
        return lambda prompts, generator: sample_rollout(engine, model, tokenizer, prompts, max_new_tokens, 1.0,
                                                         generator).response_mask.sum(1)

    return {"builtin": ours("builtin"), "continuous": ours("continuous"),
            "generate": lambda prompts, generator: generate_with_transformers(model, tokenizer, prompts,
                                                                              max_new_tokens, generator)}


def compare_engines(model, tokenizer, prompts: list[str], max_new_tokens: int, device: str,
                    names: tuple[str, ...] = ("builtin", "continuous", "generate")) -> dict[str, Any]:
    """Each engine's generated tokens/s on `prompts`, after one untimed warm-up call on a few rows
    (CUDA graphs, kernel selection), and the fraction of the decode limit it reaches."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    dtype_bytes = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = kv_bytes_per_token(model.config, dtype_bytes)
    bandwidth = measure_copy_bandwidth(device)
    prompt_tokens = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    limit = decode_limit(weight_bytes, kv, len(prompts), prompt_tokens + max_new_tokens / 2, bandwidth)
    results = {}
    for name, run in engines(model, tokenizer, max_new_tokens).items():
        if name not in names:
            continue
        run(prompts[:2], torch.Generator().manual_seed(0))  # warm-up
        sync()
        start = time.perf_counter()
        lengths = run(prompts, torch.Generator().manual_seed(1))
        sync()
        seconds = time.perf_counter() - start
        tokens = int(lengths.sum())
        results[name] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
                         "fraction_of_decode_limit": tokens / seconds / limit}
    return {"rows": len(prompts), "max_new_tokens": max_new_tokens, "weight_gb": weight_bytes / 1e9,
            "kv_bytes_per_token": kv, "copy_bandwidth_gb_per_s": bandwidth / 1e9,
            "decode_limit_tokens_per_s": limit, "engines": results}
