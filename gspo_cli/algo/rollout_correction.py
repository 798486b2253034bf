"""The gap between the sampler's and the trainer's log-probabilities of the same tokens, and
the importance weights that correct the policy gradient for it.

Inference engines (kernels, batch shapes, precision) and sampling options (top-p, top-k) make
the distribution the sampler drew from differ from the one the trainer differentiates. With
ρ_t = π_trainer(y_t) / π_sampler(y_t), the corrections in use today (TRL's
`vllm_importance_sampling_mode`, verl's `rollout_correction`) weight the loss by a ratio taken at
one of three levels,
    token:  ρ_t
    seq:    Π_t ρ_t                      the sequence's likelihood ratio
    geo:    exp(mean_t log ρ_t)          its geometric mean, length-normalised like GSPO's ratio
(a sequence's ratio repeated on its tokens), passed through one of two cuts,
    tis (truncated):  min(ρ, C)                  Yao et al. 2025, "Your efficient RL framework
                                                 secretly brings you off-policy RL training"
    mis (masked):     ρ · 1[C_low ≤ ρ ≤ C]       drops tokens/sequences the sampler got badly wrong
                                                 (verl's rejection sampling; C_low = 1/C by default)
The modes are `tis-token`, `tis-seq`, `tis-geo`, `mis-token`, `mis-seq`, `mis-geo`.

Shapes: B sequences, T response tokens; every tensor is [B, T] unless stated.
"""

from __future__ import annotations

from typing import Optional

import torch

from gspo_cli.algo.losses import Metrics, masked_mean

LEVELS = ("token", "seq", "geo")
CORRECTIONS = ("none", *(f"{cut}-{level}" for cut in ("tis", "mis") for level in LEVELS))


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


def level_log_ratio(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                    level: str) -> torch.Tensor:
    """log ρ at one of `LEVELS`, a sequence's value repeated on each of its tokens.

    `token`: log ρ_t. `seq`: Σ_t log ρ_t, the log of the product of the sequence's token ratios;
    its spread grows with the length (as √T for independent per-token errors, as T for a
    systematic one), so a band that suits short responses cuts most long ones. `geo`: mean_t log ρ_t,
    the log of the geometric mean, whose spread shrinks with the length; it is what GSPO's own
    sequence ratio takes of π_θ / π_old. Padding positions count
    nowhere, whatever they hold (NaN, ±inf): they are selected away, not multiplied by 0.

    Args:
        train_logp, sampler_logp: [B, T] log-probabilities of the sampled tokens.
        mask: [B, T] response mask.

    Returns:
        [B, T] log ρ (0 at padding for `token`; an empty response has ratio 1).
    """
    log_ratio = torch.where(mask.bool(), train_logp - sampler_logp, 0.0)  # [B, T]
    if level == "token":
        return log_ratio
    if level == "seq":
        return log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    if level == "geo":
        return masked_mean(log_ratio, mask, dim=1)[:, None].expand_as(log_ratio)
    raise ValueError(f"level {level!r} is not one of {list(LEVELS)}")


def importance_weights(train_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float, cap_low: Optional[float] = None) -> tuple[Optional[torch.Tensor], Metrics]:
    """Rollout-correction weights of one of `CORRECTIONS`, and how many were cut or masked.

    The truncated modes (`tis-*`) cut one side only, min(ρ, C), as Yao et al. 2025 and verl's
    truncate mode do: the variance an importance weight adds comes from its large values, so
    only they need a bound, and raising the small ones (max(ρ, 1/C)) would push up tokens the
    trainer finds far less likely than the sampler did, a bias with nothing to gain. The masked
    modes (`mis-*`) drop both tails, as verl's rejection sampling does: a ratio far below 1 is
    as much a sign that the sampler's token is not the trainer's as one far above it.

    Args:
        train_logp: [B, T] the trainer's log π_old; sampler_logp: [B, T] the sampler's.
        mask: [B, T] response mask (padding never counts towards a sequence's ratio).
        mode: `none` or `{tis,mis}-{token,seq,geo}` (levels: `level_log_ratio`).
        cap: C, the upper bound of both cuts.
        cap_low: lower bound of the masked modes; None: 1/C. The truncated modes ignore it.

    Returns:
        ([B, T] detached weights, a sequence's weight repeated on its tokens; None for `none`),
        metrics, token means over the response: `correction/weight_mean`, and
        `correction/truncated_fraction` (tis) or `correction/masked_fraction` with its parts
        `correction/masked_fraction_low` (ρ < C_low) and `correction/masked_fraction_high` (ρ > C)
        (mis). A sequence-level cut counts every token of the sequence.
    """
    if mode == "none":
        return None, {}
    if mode not in CORRECTIONS:
        raise ValueError(f"algo.rollout_correction={mode!r} is not one of {list(CORRECTIONS)}")
    cut_kind, level = mode.split("-")
    low = 1.0 / cap if cap_low is None else cap_low
    if cut_kind == "mis" and not 0.0 <= low < cap:
        raise ValueError(f"the masked modes keep ratios in [{low}, {cap}]: algo.rollout_correction_cap_low "
                         f"must be at least 0 and below algo.rollout_correction_cap")
    with torch.no_grad():
        # A ratio of thousands of tokens may overflow to inf or underflow to 0; both compare
        # correctly with the bounds, and the weights below never keep an inf.
        ratio = torch.exp(level_log_ratio(train_logp, sampler_logp, mask, level))  # [B, T]
        high = ratio > cap
        if cut_kind == "tis":
            weights = torch.where(high, cap, ratio)
            return weights, {"correction/weight_mean": masked_mean(weights, mask),
                             "correction/truncated_fraction": masked_mean(high.float(), mask)}
        below = ratio < low
        weights = torch.where(high | below, 0.0, ratio)
        return weights, {"correction/weight_mean": masked_mean(weights, mask),
                         "correction/masked_fraction": masked_mean((high | below).float(), mask),
                         "correction/masked_fraction_low": masked_mean(below.float(), mask),
                         "correction/masked_fraction_high": masked_mean(high.float(), mask)}
