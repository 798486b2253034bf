"""The gap between the sampler's and the trainer's log-probabilities of the same tokens, and
the importance weights that correct the policy gradient for it.

Inference engines (kernels, batch shapes, precision) and sampling options (top-p, top-k) make
the distribution the sampler drew from differ from the one the trainer differentiates. With
ρ = π_trainer(y) / π_sampler(y), per token or per sequence (the product of a sequence's token
ratios), the corrections in use today (TRL's `vllm_importance_sampling_mode`, verl's
`rollout_correction`) weight the loss by
    tis (truncated):  min(ρ, C)                  Yao et al. 2025, "Your efficient RL framework
                                                 secretly brings you off-policy RL training"
    mis (masked):     ρ · 1[ρ ≤ C]               drops tokens/sequences the sampler got badly wrong

Shapes: B sequences, T response tokens; every tensor is [B, T] unless stated.
"""

from __future__ import annotations

from typing import Optional

import torch

from gspo_cli.algo.losses import Metrics, masked_mean

CORRECTIONS = ("none", "tis-token", "tis-seq", "mis-token", "mis-seq")


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


def importance_weights(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[Optional[torch.Tensor], Metrics]:
    """Rollout-correction weights of one of `CORRECTIONS`, and how many were cut or masked.

    Args:
        train_logp: [B, T] the trainer's log π_old; sampler_logp: [B, T] the sampler's.
        mask: [B, T] response mask (padding never counts towards a sequence's ratio).
        mode: `none`, `tis-token`, `tis-seq`, `mis-token` or `mis-seq`.
        cap: C.

    Returns:
        ([B, T] detached weights, a sequence's weight repeated on its tokens; None for `none`),
        metrics `correction/weight_mean` and `correction/truncated_fraction` (tis) or
        `correction/masked_fraction` (mis), token means over the response.
    """
    if mode == "none":
        return None, {}
    if mode not in CORRECTIONS:
        raise ValueError(f"algo.rollout_correction={mode!r} is not one of {list(CORRECTIONS)}")
    with torch.no_grad():
        log_ratio = torch.where(mask.bool(), train_logp - sampler_logp, 0.0)  # [B, T]
        if mode.endswith("-seq"):
            log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)  # log Π_t ρ_t on every token
        ratio = torch.exp(log_ratio)
        cut = ratio > cap
        weights = ratio.clamp(max=cap) if mode.startswith("tis") else torch.where(cut, 0.0, ratio)
        kind = "truncated" if mode.startswith("tis") else "masked"
        return weights, {"correction/weight_mean": masked_mean(weights, mask),
                         f"correction/{kind}_fraction": masked_mean(cut.float(), mask)}
