"""RMSNorm as one autograd node, for the T5-style norms of Qwen, Llama and Mistral models.

transformers writes RMSNorm as six tensor operations, so autograd saves their inputs
and runs a backward kernel for each: on the benchmark model (issue 9) the norms of one
mini-batch took 13 ms per [9,344 × 256] call forward and backward. `_RMSNorm` saves the
normalised input and the inverse RMS and differentiates by hand (7 ms). Its forward is
the same arithmetic in the same order, so outputs, and therefore sampled tokens, are
bitwise those of the original; gradients agree up to float rounding (tests/test_norms.py).
"""

from __future__ import annotations

import types

import torch
from torch import nn

# Norms computing `weight * (x * rsqrt(mean(x²) + eps))` with a `variance_epsilon`: transformers'
# "equivalent to T5LayerNorm" family. Gemma's `(1 + weight)` variant is not one of them.
SUPPORTED = frozenset({"Qwen3MoeRMSNorm", "Qwen3RMSNorm", "Qwen2MoeRMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm",
                       "MistralRMSNorm", "MixtralRMSNorm"})


class _RMSNorm(torch.autograd.Function):
    """y = w · x̂ with x̂ = x · r, r = (mean(x², -1) + eps)^(-1/2).

    Shapes: x [..., H], w [H] -> y [..., H]. Backward, with g = dL/dy:
    dL/dw = Σ g·x̂ over all rows; dL/dx = r · (g·w − x̂ · mean(g·w·x̂, -1)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        normed = x * inv_rms
        ctx.save_for_backward(normed, inv_rms, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, inv_rms, weight = ctx.saved_tensors
        grad_normed = grad * weight
        grad_weight = (grad * normed).reshape(-1, grad.shape[-1]).sum(0)
        projection = (grad_normed * normed).mean(-1, keepdim=True)  # [..., 1]
        grad_x = grad_normed.sub_(normed * projection).mul_(inv_rms)
        return grad_x, grad_weight, None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)  # other dtypes cast in between: the original


def fuse_rms_norms(model: nn.Module) -> int:
    """Run every supported RMSNorm of `model` through `_RMSNorm`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in SUPPORTED and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
