"""A faster Mixture-of-Experts MLP for CPU training: tokens sorted by expert, one matmul per expert.

transformers (≥ 5) lets a model choose how its experts run (`experts_implementation`);
its CPU paths index, multiply and concatenate whole [tokens × k, width] tensors several
times per layer, and the backward pass of their row gathers goes through a slow
accumulating scatter. `sorted_experts_forward` sorts the (token, expert) pairs once and
runs each expert's SwiGLU on its contiguous block inside one autograd function with a
hand-written backward, so the elementwise work stays in cache-sized blocks; moving rows
back and forth is a gather in both directions. On the benchmark model (16 experts, top-2,
9,600 tokens) a forward and backward pass took 2.28 s against 2.98 s with `grouped_mm`
(median of 5, `tests/test_experts.py` checks the numbers match).

It is registered under the name `gspo_sorted`; `model.experts_implementation=auto` picks
it on CPU and leaves transformers' choice (a fused grouped GEMM) on GPUs.

Shapes: T tokens, k experts per token, S = T·k (token, expert) pairs, H model width,
I expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "gspo_sorted"


class _PermuteRows(torch.autograd.Function):
    """`x[order]` for a permutation `order` [S]; the gradient is a gather with its inverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherTokens(torch.autograd.Function):
    """Token rows [T, H] -> (token, expert) pair rows [S, H] sorted by expert, S = T·k.

    `order` [S] lists pairs (pair j is token j // k) in expert order, `inverse` is its inverse
    permutation. The gradient gathers the pairs back into token order and adds each token's k rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        by_pair = grad.index_select(0, inverse)
        return by_pair.view(-1, ctx.k, by_pair.shape[-1]).sum(1), None, None, None


class _GroupedSwiGLU(torch.autograd.Function):
    """Expert e's `down_e(silu(gate_e x) * up_e x)` on its block of rows, for every expert.

    Forward: x [S, H] sorted by expert, gate_up [E, 2I, H] (gate rows first), down [E, H, I],
    counts: rows per expert (a list, summing to S). Returns [S, H].
    Saves x and the [S, 2I] projections; the [rows, I] activations and gradients live one
    expert's block at a time, small enough to stay in cache between the matmuls that use them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]) -> torch.Tensor:
        width = down.shape[2]
        out = x.new_empty(x.shape[0], down.shape[1])
        projections = x.new_empty(x.shape[0], 2 * width)
        start = 0
        for expert, rows in enumerate(counts):
            if rows == 0:
                continue
            block = slice(start, start + rows)
            gate_up_x = torch.mm(x[block], gate_up[expert].t(), out=projections[block])
            hidden = F.silu(gate_up_x[:, :width]).mul_(gate_up_x[:, width:])
            torch.mm(hidden, down[expert].t(), out=out[block])
            start += rows
        ctx.counts = counts
        ctx.save_for_backward(x, gate_up, down, projections)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gate_up, down, projections = ctx.saved_tensors
        width = down.shape[2]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        grad_gate_up, grad_down = torch.empty_like(gate_up), torch.empty_like(down)
        start = 0
        for expert, rows in enumerate(ctx.counts):
            if rows == 0:  # an expert no token chose gets no gradient
                grad_gate_up[expert].zero_()
                grad_down[expert].zero_()
                continue
            block = slice(start, start + rows)
            gate, up = projections[block, :width], projections[block, width:]
            silu_gate = F.silu(gate)
            torch.mm(grad_out[block].t(), silu_gate * up, out=grad_down[expert])  # the forward's activations
            grad_hidden = grad_out[block] @ down[expert]  # [rows, I]
            grad_proj = x.new_empty(rows, 2 * width)
            # d/d gate of silu(gate)·up is up·silu'(gate); d/d up is silu(gate).
            torch.ops.aten.silu_backward(grad_hidden * up, gate, grad_input=grad_proj[:, :width])
            torch.mul(grad_hidden, silu_gate, out=grad_proj[:, width:])
            torch.mm(grad_proj.t(), x[block], out=grad_gate_up[expert])
            torch.mm(grad_proj, gate_up[expert], out=grad_x[block])
            start += rows
        return grad_x, grad_gate_up, grad_down, None


def _grouped_mm_works() -> bool:
    """Whether this torch has `torch._grouped_mm` for CPU float32 (2.8+; a private op, so probed)."""
    try:
        x, w = torch.ones(3, 4), torch.ones(2, 4, 8)
        out = torch._grouped_mm(x, w, offs=torch.tensor([1, 3], dtype=torch.int32))
        return out.shape == (3, 8) and bool((out == 4).all())
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False


GROUPED_MM_ON_CPU = _grouped_mm_works()


def grouped_swiglu_inference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                             counts: list[int]) -> torch.Tensor:
    """`_GroupedSwiGLU`'s forward without autograd, for sampling: [S, H] -> [S, H].

    Decoding one token per sequence leaves each expert ~64 rows, where the Python loop
    over experts costs as much as a matmul; `torch._grouped_mm` runs all experts' blocks in
    one call. Same per-block sgemm, so the outputs are those of the loop (bitwise on the CPUs
    measured; tests/test_experts.py allows float rounding, as two kernels may sum in another
    order elsewhere); a MoE block at one decoding step of the benchmark batch (1,024 pairs)
    took 8.66 against 9.16 ms (median of 200 alternated calls).
    """
    width = down.shape[2]
    # The op wants rows that start on 16-byte boundaries: widths of 4 float32s (any real model).
    aligned = all(size * x.element_size() % 16 == 0 for size in (x.shape[1], width))
    if not (GROUPED_MM_ON_CPU and aligned and x.device.type == "cpu"):
        return _GroupedSwiGLU.apply(x, gate_up, down, counts)  # records nothing under no_grad
    ends = torch.tensor(counts, dtype=torch.int64).cumsum_(0).to(torch.int32)
    projections = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=ends)  # [S, 2I]
    hidden = F.silu(projections[:, :width]).mul_(projections[:, width:])
    return torch._grouped_mm(hidden, down.transpose(1, 2), offs=ends)


def supports(experts: nn.Module) -> bool:
    """Whether `experts` has the layout this kernel computes: concatenated [gate; up] weights
    stored [E, 2I, H], no biases, no post-expert norm, SiLU gate (Qwen3-MoE and its kin)."""
    config = getattr(experts, "config", None)
    return (getattr(experts, "has_gate", False) and getattr(experts, "is_concatenated", False)
            and not getattr(experts, "is_transposed", True) and not getattr(experts, "has_bias", True)
            and not getattr(experts, "has_post_expert_norm", True) and not getattr(experts, "_is_expert_parallel", True)
            and getattr(config, "hidden_act", None) == "silu" and hasattr(experts, "gate_up_proj"))


def sorted_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output [T, H] for hidden_states [T, H], chosen experts and weights [T, k].

    Falls back to transformers' grouped GEMM for layouts it does not cover and under
    autocast (its matmuls write into preallocated outputs, which autocast cannot cast).
    """
    if not supports(self) or torch.is_autocast_enabled(hidden_states.device.type):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, width = hidden_states.shape
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)  # [S]: pair j is token j // k
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    by_expert = _GatherTokens.apply(hidden_states, order, inverse, k)  # [S, H]
    # Sampling records no graph, so its experts can run without the autograd kernel's loop.
    swiglu = _GroupedSwiGLU.apply if torch.is_grad_enabled() else grouped_swiglu_inference
    outputs = swiglu(by_expert, self.gate_up_proj, self.down_proj, counts)
    per_token = _PermuteRows.apply(outputs, inverse, order).view(num_tokens, k, width)
    # Weighted sum over the k experts of each token: [T, 1, k] @ [T, k, H].
    return torch.bmm(top_k_weights.unsqueeze(1).to(per_token.dtype), per_token).squeeze(1)


def _register() -> bool:
    """Make `gspo_sorted` a valid `experts_implementation`; False on transformers without one."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, sorted_experts_forward)
    return True


REGISTERED = _register()  # once, when the module is imported


def choose(requested: str, device: str) -> str | None:
    """The implementation to set for `model.experts_implementation=requested` on `device`.

    "auto" is this module's kernel on CPU (measured faster there) and None (keep
    transformers' default) elsewhere; "default" is always None; any other name is passed through.
    """
    if requested == "default":
        return None
    if requested == "auto":
        return NAME if torch.device(device).type == "cpu" else None
    return requested
