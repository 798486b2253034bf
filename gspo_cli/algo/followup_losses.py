"""GSPO's follow-ups: LUSPO, VESPO, IcePop, DPPO, Clip-Cov and KL-Cov, with the registry's signature.

Each is registered in `losses.LOSSES` and called like every loss there:

    loss, metrics = LOSSES[name](logp, old_logp, advantages, mask, clip_low=..., clip_high=...,
                                 loss_agg=..., is_weights=..., **params)

Shapes: B sequences, T response tokens; logp, old_logp, mask, is_weights [B, T]; advantages [B]
(or [B, T]). IcePop also reads `sampler_logp` [B, T], the sampler's log-probabilities of the
same tokens, when the trainer passes it. Where a method's bounds are not a ratio clip range,
`clip_low`/`clip_high` carry its own two bounds (DPPO: the probability change allowed), as
`gmpo` carries log-space bounds; a loss without any ignores them.

Sources: LUSPO and VESPO follow TRL 1.16's `GRPOTrainer` (loss_type "luspo", "vespo"), checked
against it in tests/test_followup_losses.py; DPPO follows prime-rl's default loss; Clip-Cov and
KL-Cov follow verl's `clip_cov` and `kl_cov`; IcePop the Ring-1T report (arXiv 2510.18855).
The formulas, defaults and sections are in docs/algorithms.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from gspo_cli.algo.aggregation import aggregate
from gspo_cli.algo.loss_terms import (
    Metrics,
    clipped_surrogate,
    common_metrics,
    masked_mean,
    padding_neutral,
    per_sequence_metrics,
    sequence_surrogate,
    sequence_weights,
    token_advantages,
    weighted,
)

# ---------------------------------------------------------------------------- LUSPO


@padding_neutral
def luspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    *,
    loss_agg: str = "seq-mean-token-sum",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """LUSPO (arXiv 2602.05261): GSPO's clipped sequence surrogate, each sequence's loss times its length.

    GSPO averages over sequences, so a long response moves each of its tokens less than a short
    one; LUSPO multiplies sequence i's term by |y_i|: Σ_i |y_i| ℓ_i / B, which is `aggregate`'s
    seq-mean-token-sum of a per-sequence term (TRL: `(per_token_loss * mask).sum(-1).mean()`).

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B].
        clip_low, clip_high: GSPO's sequence clip range.
    """
    per_seq, seq_ratio, low, high = sequence_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    loss = aggregate(weighted(per_seq, sequence_weights(is_weights, mask)), mask, loss_agg, **agg)
    return loss, per_sequence_metrics(seq_ratio, logp, old_logp, mask, low, high, advantages=advantages)


# ---------------------------------------------------------------------------- VESPO

LOG_W_MIN = math.log(1e-8)  # TRL's (and VESPO's code's) floor for the log sequence weight


def sequence_log_weight(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                        is_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log w_i = Σ_t log(π_θ/π_old): VESPO's sequence weight, a sum (no length normalisation).

    Token log-ratios are clamped to [−20, 20] before the sum; rollout-correction weights ρ_t, when
    given, join the sum as Σ_t log ρ_t (each clamped to [log 1e-8, 20]), so w is π_θ/π_sampler;
    the total is clamped to [log 1e-8, 20], as TRL does.

    Args:
        logp, old_logp, mask, is_weights: [B, T].

    Returns:
        [B] log w_i.
    """
    real = mask.bool()
    log_w = torch.where(real, (logp - old_logp).clamp(-20.0, 20.0), 0.0).sum(1)
    if is_weights is not None:
        log_rho = torch.log(is_weights).clamp(LOG_W_MIN, 20.0)
        log_w = log_w + torch.where(real, log_rho, 0.0).sum(1)
    return log_w.clamp(LOG_W_MIN, 20.0)


def gamma_weight(log_w: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """φ(w) = e^λ · w^k · e^(−λ w), the Gamma-shaped kernel of VESPO, with φ(1) = 1.

    It rises as w^k below 1 and decays as e^(−λ w) above: sequences the current policy finds much
    less or much more likely than the sampler did get a small weight, never a hard cut.

    Args:
        log_w: [...] log sequence weights; k, lam: broadcastable exponents and decay rates.

    Returns:
        φ, computed in log space as exp(λ + k log w − λ w); NaN and ±inf become 0.
    """
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@padding_neutral
def vespo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.0,
    clip_high: float = 0.0,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    loss_agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """VESPO (arXiv 2602.10693): −sg[φ(w_i)] · A · log π_θ(y_t), with w_i the unnormalised sequence ratio.

    (k, λ) are (k_pos, lambda_pos) where A ≥ 0, else (k_neg, lambda_neg). φ is detached: it only
    scales each sequence's REINFORCE gradient, so nothing is clipped (clip_low/clip_high are
    unused). Rollout-correction weights enter w (see `sequence_log_weight`), not the loss. A token
    counts as "clipped" when φ < 1/2 (its gradient at least halved), low or high side by w < 1 or
    w > 1; `gate/seq_weight_mean` is the mean φ over sequences (TRL's `vespo/phi_seq_mean`).

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
    """
    token_adv = token_advantages(advantages, mask)  # [B, T]
    log_w = sequence_log_weight(logp, old_logp, mask, is_weights).detach()[:, None]  # [B, 1]
    nonneg = token_adv >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = gamma_weight(log_w, k, lam)  # [B, T]: one value per sequence unless A varies by token
    loss = aggregate(-phi * token_adv * logp, mask, loss_agg, **agg)
    damped = phi < 0.5
    metrics = common_metrics(torch.exp(logp - old_logp), logp, old_logp, mask, damped & (log_w < 0),
                             damped & (log_w > 0), advantages=advantages)
    metrics["gate/seq_weight_mean"] = masked_mean(phi, mask, dim=1).mean()
    return loss, metrics


# ---------------------------------------------------------------------------- IcePop


def icepop_weights(old_logp: torch.Tensor, sampler_logp: Optional[torch.Tensor], low: float,
                   high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IcePop's M(k) = k · 1[α ≤ k ≤ β] with k = π_trainer(y_t; θ_old) / π_sampler(y_t; θ_old).

    Args:
        old_logp, sampler_logp: [B, T]; sampler_logp None means π_old is the sampler's (k = 1).
        low, high: α, β.

    Returns:
        ([B, T] detached weights, masked below α, masked above β).
    """
    if sampler_logp is None:
        k = torch.ones_like(old_logp)
    else:
        k = torch.exp(old_logp - sampler_logp).detach()
    below, above = k < low, k > high
    return torch.where(below | above, 0.0, k), below, above


@padding_neutral
def icepop_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.27,
    *,
    band_low: float = 0.5,
    band_high: float = 5.0,
    sampler_logp: Optional[torch.Tensor] = None,
    loss_agg: str = "seq-mean-token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """IcePop (Ring-1T, arXiv 2510.18855): GRPO's token surrogate weighted by M(k), k the
    trainer/sampler probability ratio of the token under π_old.

    Tokens whose k leaves [band_low, band_high] (the engines disagree too much) are masked out
    of the gradient; the others are weighted by k, a (two-sided) masked importance correction.
    Without `sampler_logp` (the trainer has not passed it) π_old stands for the sampler's numbers:
    k = 1 and the loss is GRPO's. `icepop/masked_fraction` is the share of tokens masked,
    `icepop/weight_mean` the mean M(k).

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
        clip_low, clip_high: GRPO's token clip range.
        band_low, band_high: α, β (paper: 0.5, 5).
        sampler_logp: [B, T] the sampler's log-probabilities, or None.
    """
    weight, below, above = icepop_weights(old_logp, sampler_logp, band_low, band_high)
    token_ratio = torch.exp(logp - old_logp)  # [B, T]
    per_token, low, high = clipped_surrogate(token_ratio, token_advantages(advantages, mask), clip_low, clip_high)
    loss = aggregate(weighted(per_token * weight, is_weights), mask, loss_agg, **agg)
    metrics = common_metrics(token_ratio, logp, old_logp, mask, low, high, advantages=advantages)
    metrics["icepop/masked_fraction"] = masked_mean((below | above).float(), mask)
    metrics["icepop/weight_mean"] = masked_mean(weight, mask)
    return loss, metrics


# ---------------------------------------------------------------------------- DPPO


def dppo_masks(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, low: float,
               high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPPO-Binary-TV's trust region, as prime-rl applies it: the change of the sampled token's
    probability, p_θ − p_old, may not exceed `high` where A > 0 nor fall below −`low` where A < 0.

    Args:
        logp, old_logp, advantages: [B, T].

    Returns:
        (masked_low, masked_high), [B, T] booleans: tokens left out on each side.
    """
    change = (torch.exp(logp) - torch.exp(old_logp)).detach()
    return (advantages < 0) & (change < -low), (advantages > 0) & (change > high)


@padding_neutral
def dppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    *,
    adv_tau: float = 1.0,
    kl_tau: float = 1e-3,
    loss_agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """DPPO (arXiv 2602.04879) as prime-rl's default loss: −keep · τ_A · A · r + τ_KL · (log r)² per token.

    r = π_θ/π_old is not clipped; instead a token whose probability moved past the trust region
    in the direction its advantage pushes (`dppo_masks`) is left out of the policy term. The
    squared log-ratio (Kimi K2.5's KL term) acts on every token. `clip/*` counts the tokens left out.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
        clip_low, clip_high: δ_low, δ_high, bounds on p_θ − p_old (prime-rl: 0.2, 0.2).
        adv_tau, kl_tau: weights of the policy term and of the KL term (prime-rl: 1, 1e-3).
    """
    token_adv = token_advantages(advantages, mask)
    log_ratio = logp - old_logp
    token_ratio = torch.exp(log_ratio)
    low, high = dppo_masks(logp, old_logp, token_adv, clip_low, clip_high)
    keep = ~(low | high)
    per_token = -torch.where(keep, adv_tau * token_adv * token_ratio, 0.0) + kl_tau * log_ratio ** 2
    loss = aggregate(weighted(per_token, is_weights), mask, loss_agg, **agg)
    return loss, common_metrics(token_ratio, logp, old_logp, mask, low, high, advantages=advantages)


# ---------------------------------------------------------------------------- Clip-Cov and KL-Cov


def centred_covariance(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each token's term of Cov(A, log π): (A − mean A)(log π − mean log π), means over the
    response tokens of the batch (arXiv 2505.22617: tokens with a large term drive entropy down).

    Args:
        advantages, logp, mask: [B, T] (advantages per token).

    Returns:
        [B, T] detached terms; −inf at padding, so a selection never picks it.
    """
    with torch.no_grad():
        centred = (advantages - masked_mean(advantages, mask)) * (logp - masked_mean(logp, mask))
        return torch.where(mask.bool(), centred, -torch.inf)


def selection_size(mask: torch.Tensor, ratio: float) -> int:
    """max(⌊ratio · N⌋, 1) tokens of the N response tokens, as verl counts them."""
    return max(int(ratio * mask.sum().item()), 1)


def random_band_selection(cov: torch.Tensor, eligible: torch.Tensor, lower: float, upper: float,
                          count: int) -> torch.Tensor:
    """Clip-Cov's pick: `count` tokens drawn at random (torch's global generator) among the
    eligible ones whose covariance term lies strictly inside (lower, upper).

    Args:
        cov, eligible: [B, T].

    Returns:
        [B, T] boolean selection (fewer than `count` when fewer qualify).
    """
    candidates = (eligible & (cov > lower) & (cov < upper)).flatten().nonzero().squeeze(1)
    chosen = candidates[torch.randperm(len(candidates))[:count].to(candidates.device)]
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    selected[chosen] = True
    return selected.view_as(cov)


def top_selection(cov: torch.Tensor, count: int) -> torch.Tensor:
    """KL-Cov's pick: the `count` tokens with the largest covariance terms ([B, T] -> [B, T] bool)."""
    chosen = torch.topk(cov.flatten(), count).indices
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    selected[chosen] = True
    return selected.view_as(cov)


@padding_neutral
def clip_cov_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 1.0,
    clip_high: float = 1.0,
    *,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    loss_agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """Clip-Cov (arXiv 2505.22617; verl `clip_cov`): PPO's token surrogate, with a random
    clip_cov_ratio share of the tokens whose covariance term lies in (clip_cov_lb, clip_cov_ub)
    taken out of the gradient (their loss is set to 0).

    Tokens the PPO clip already holds are not candidates. The covariance and the count are those
    of the batch this call sees (a micro-batch, one rank's share), as in verl. `cov/selected_fraction`
    is the share of tokens detached; `clip/fraction` counts them with the PPO-clipped ones.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
        clip_low, clip_high: PPO's clip range (the authors' recipe: 1, 1, so [0, 2]).
    """
    token_adv = token_advantages(advantages, mask)
    token_ratio = torch.exp(logp - old_logp)
    per_token, low, high = clipped_surrogate(token_ratio, token_adv, clip_low, clip_high)
    cov = centred_covariance(token_adv, logp, mask)
    selected = random_band_selection(cov, mask.bool() & ~(low | high), clip_cov_lb, clip_cov_ub,
                                     selection_size(mask, clip_cov_ratio))
    loss = aggregate(weighted(torch.where(selected, 0.0, per_token), is_weights), mask, loss_agg, **agg)
    metrics = common_metrics(token_ratio, logp, old_logp, mask, low | (selected & (token_adv < 0)),
                             high | (selected & (token_adv >= 0)), advantages=advantages)
    metrics["clip/low_fraction"] = masked_mean(low.float(), mask)  # the PPO clip's own sides
    metrics["clip/high_fraction"] = masked_mean(high.float(), mask)
    metrics["cov/selected_fraction"] = masked_mean(selected.float(), mask)
    return loss, metrics


@padding_neutral
def kl_cov_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    *,
    kl_cov_ratio: float = 2e-3,
    kl_coef: float = 1.0,
    loss_agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """KL-Cov (arXiv 2505.22617; verl `kl_cov`): −r · A per token, unclipped, plus kl_coef · |log r|
    on the kl_cov_ratio share of tokens with the largest covariance terms.

    Nothing is clipped (clip_low/clip_high are unused; `clip/*` stays 0); the penalty pulls the
    selected tokens back towards π_old. Selection per call, as in Clip-Cov. `cov/selected_fraction`
    is the share of tokens penalised.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
    """
    token_adv = token_advantages(advantages, mask)
    log_ratio = logp - old_logp
    token_ratio = torch.exp(log_ratio)
    selected = top_selection(centred_covariance(token_adv, logp, mask), selection_size(mask, kl_cov_ratio))
    per_token = -token_adv * token_ratio + torch.where(selected, kl_coef * log_ratio.abs(), 0.0)
    loss = aggregate(weighted(per_token, is_weights), mask, loss_agg, **agg)
    none = torch.zeros_like(selected)
    metrics = common_metrics(token_ratio, logp, old_logp, mask, none, none, advantages=advantages)
    metrics["cov/selected_fraction"] = masked_mean(selected.float(), mask)
    return loss, metrics
