"""Model FLOPs of a training step, and the dense matmul throughput of this machine.

Training cost uses the usual estimate of 6 FLOPs per active parameter per token processed
(2 for the forward matmuls, 4 for the backward; Kaplan et al. 2020, §2.1), with attention
scores left out: at ~70 tokens per sequence they are under 2% of the matmul work here.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def active_params(config: Any) -> int:
    """Matmul weights one token passes through: attention, router, top-k experts, LM head.

    Embedding lookups and norms do no matmul and are left out; the tied LM head is counted
    once, as the output projection.

    Args:
        config: a Hugging Face Qwen3 or Qwen3-MoE config (`num_experts` absent or 0: dense).
    """
    h, heads, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = h * heads * hd * 2 + h * kv * hd * 2  # q and o projections, then k and v
    num_experts = getattr(config, "num_experts", 0) or 0
    if num_experts:
        mlp = h * num_experts + config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
    else:
        mlp = 3 * h * config.intermediate_size  # gate, up and down projections
    return config.num_hidden_layers * (attention + mlp) + h * config.vocab_size


def step_flops(num_active: int, tokens: int) -> dict[str, float]:
    """FLOPs of each phase of one RL step over `tokens` (prompt + response) tokens.

    Generation and π_old each run one forward pass over every token (2 FLOPs per active
    parameter, the KV cache makes generation no dearer); the policy update runs forward and
    backward once over every token (6 per parameter), split over the mini-batches.

    Returns:
        {"generate": 2·N·D, "old_logp": 2·N·D, "update": 6·N·D, "step": 10·N·D}.
    """
    forward = 2.0 * num_active * tokens
    return {"generate": forward, "old_logp": forward, "update": 3 * forward, "step": 5 * forward}


def matmul_shapes(num_seqs: int, seq_len: int, config: Any, num_minibatches: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the policy update's main matmuls for one mini-batch.

    Rows are the mini-batch's tokens for the attention projections and the LM head, and
    the tokens routed to one expert (top-k of E, evenly spread) for an expert projection.
    """
    rows = num_seqs // num_minibatches * seq_len
    h = config.hidden_size
    shapes = [(rows, h, config.num_attention_heads * config.head_dim), (rows, h, config.vocab_size)]
    num_experts = getattr(config, "num_experts", 0) or 0
    if num_experts:
        per_expert = max(1, rows * config.num_experts_per_tok // num_experts)
        shapes.append((per_expert, h, config.moe_intermediate_size))
    else:
        shapes.append((rows, h, config.intermediate_size))
    return shapes


def measure_matmul(shape: tuple[int, int, int], seconds: float = 0.5, repeats: int = 5,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of `[M, K] @ [K, N]` on `device` in `dtype` over `repeats` timings of
    ~`seconds`/repeats each.

    The best, not the mean: it estimates what the hardware gives when the (shared) CPU
    lets it, which is the ceiling a training phase could reach. On a GPU every timing
    waits for the device to finish.
    """
    m, k, n = shape
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    sync()
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    sync()
    iters = max(1, int(seconds / repeats / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - start) / iters)
    return 2.0 * m * k * n / best


def matmul_throughput(shapes: list[tuple[int, int, int]], seconds: float = 0.5, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """FLOP/s of each shape and the best of them (the reference for utilisation)."""
    results = [{"shape": list(s), "flops_per_s": measure_matmul(s, seconds, device=device, dtype=dtype)}
               for s in shapes]
    return {"shapes": results, "best_flops_per_s": max(r["flops_per_s"] for r in results),
            "num_threads": torch.get_num_threads(), "device": device, "dtype": str(dtype).removeprefix("torch.")}
