"""The KL penalty to a frozen reference policy, per token.

Shapes: B sequences, T response tokens; every tensor is [B, T] unless stated.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled by the policy.

    With log ρ = log π_ref − log π_θ (Schulman, "Approximating KL divergence", 2020):
        k1 = −log ρ                unbiased, can be negative, high variance
        k2 = (log ρ)² / 2          biased, low variance, ≥ 0
        k3 = (ρ − 1) − log ρ       unbiased, low variance, ≥ 0 (GRPO's penalty, DeepSeekMath eq. 4)
    All three are 0 where the two policies agree.

    Args:
        logp: log π_θ, with gradient; ref_logp: log π_ref, no gradient.
        estimator: one of `KL_ESTIMATORS`.

    Returns:
        [B, T] estimates (padding positions hold values to be masked).
    """
    log_rho = ref_logp - logp
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho ** 2
    if estimator == "k3":
        return torch.expm1(log_rho) - log_rho
    raise ValueError(f"algo.kl_estimator={estimator!r} is not one of {list(KL_ESTIMATORS)}")
