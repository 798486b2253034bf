"""The gap between the sampler's and the trainer's log-probabilities of the same tokens, and
the importance weights that correct the policy gradient for it.

Shapes: B sequences, T response tokens; every tensor is [B, T] unless stated.
"""

from __future__ import annotations

import torch

from gspo_cli.algo.losses import Metrics, masked_mean


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
