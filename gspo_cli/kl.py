"""Divergences between policies: the KL penalty to a frozen reference, and the gap between
the log-probabilities the sampler reported and those the trainer computes.

Shapes: B sequences, T response tokens; every tensor is [B, T] unless stated.
"""

from __future__ import annotations

import torch

from gspo_cli.losses import Metrics, masked_mean

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


def logp_mismatch(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """How far the trainer's log-probabilities of the sampled tokens are from the sampler's.

    Inference engines (kernels, batch shapes, precision) compute slightly different numbers
    than the training forward pass; the GSPO paper (its section on RL infrastructure) notes
    that its length-normalised sequence ratio tolerates that gap. `mismatch/logp_abs_diff` is the token mean of |Δ log p|;
    `mismatch/seq_ratio_max` is the largest GSPO-style sequence ratio between the two,
    max_i exp(|mean_t Δ log p|) ≥ 1, so 1 means no gap.
    """
    with torch.no_grad():
        diff = (train_logp - sampler_logp).detach()
        seq = masked_mean(diff, mask, dim=1)  # [B]
        return {
            "mismatch/logp_abs_diff": masked_mean(diff.abs(), mask),
            "mismatch/seq_ratio_max": seq.abs().max().exp(),
        }


def truncated_is_weights(train_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): min(π_train(y_t) / π_sampler(y_t), cap) per token.

    Corrects the policy gradient for tokens the sampler drew from a slightly different
    distribution than the one the trainer differentiates; the cap bounds the variance.

    Returns:
        [B, T] detached weights.
    """
    return torch.exp(train_logp - sampler_logp).detach().clamp(max=cap)
