"""The pieces every policy loss is built from: masked means, the sequence ratio, PPO's clipped
surrogate, the guard that keeps padding out of the arithmetic, and the metrics every loss logs.

Shapes: B sequences (responses), T response tokens (right-padded); `mask` [B, T] is 1.0 on
response tokens. The losses are in `losses.py` (with the registry) and `followup_losses.py`;
this module imports nothing from the package, so both import it and neither imports the other
the wrong way.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

Metrics = dict[str, torch.Tensor]
LossFn = Callable[..., tuple[torch.Tensor, Metrics]]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1, over `dim` (all elements when None).

    Masked-out values are selected away, not multiplied by 0: a NaN or inf there (NaN · 0 = NaN)
    does not reach the mean.
    """
    kept = torch.where(mask.bool(), values, 0.0)
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1.0)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1.0)


def padding_neutral(loss_fn: LossFn) -> LossFn:
    """`loss_fn` run on inputs whose padding positions hold neutral values: log-probabilities 0
    (ratio 1), token advantages 0, importance weights 1, the sampler's log-probabilities 0.

    Whatever the sampler or the forward pass left at padding (an inference engine's -inf, a
    NaN) then never enters the arithmetic: masking only the result would not stop it, as
    exp(inf) · 0 and NaN · 0 are NaN, in the loss and in its gradient. Real positions are
    passed through unchanged, so the loss and its gradient there are as before.
    """

    @functools.wraps(loss_fn)
    def wrapped(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *args, is_weights: Optional[torch.Tensor] = None, **kwargs) -> tuple[torch.Tensor, Metrics]:
        real = mask.bool()
        logp, old_logp = torch.where(real, logp, 0.0), torch.where(real, old_logp, 0.0)
        if advantages.dim() == 2:
            advantages = torch.where(real, advantages, 0.0)
        if is_weights is not None:
            is_weights = torch.where(real, is_weights, 1.0)
        if kwargs.get("sampler_logp") is not None:
            kwargs["sampler_logp"] = torch.where(real, kwargs["sampler_logp"], 0.0)
        return loss_fn(logp, old_logp, advantages, mask, *args, is_weights=is_weights, **kwargs)

    return wrapped


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) Σ_t (log π_θ − log π_old): the log of GSPO's length-normalised ratio.

    Args:
        logp, old_logp, mask: [B, T].

    Returns:
        [B] log sequence ratios.
    """
    return masked_mean(logp - old_logp, mask, dim=1)


def sequence_weights(is_weights: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Geometric mean of token weights per sequence ([B, T] -> [B]), matching GSPO's ratio."""
    if is_weights is None:
        return None
    return torch.exp(masked_mean(torch.log(is_weights.clamp(min=1e-12)), mask, dim=1))


def weighted(values: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """`values` times `weights` (same or broadcastable shape), or `values` when there are none."""
    return values if weights is None else values * weights


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), elementwise.

    Returns:
        (loss, clipped_low, clipped_high): the per-element loss and two boolean masks of
        where the lower clip (A < 0, r < 1 − ε_low) or the upper clip (A > 0, r > 1 + ε_high)
        is active.
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
    clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return loss, clipped_low, clipped_high


def sequence_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_low: float, clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO's clipped surrogate on the length-normalised sequence ratio s_i (paper eq. 5).

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B].

    Returns:
        (per_seq, seq_ratio, clipped_low, clipped_high), each [B]: −min(s_i A_i, clip(s_i) A_i),
        s_i, and where the lower or the upper clip is active.
    """
    seq_ratio = torch.exp(sequence_log_ratio(logp, old_logp, mask))  # [B]
    per_seq, low, high = clipped_surrogate(seq_ratio, advantages, clip_low, clip_high)
    return per_seq, seq_ratio, low, high


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] or [B, T] advantages as [B, T]."""
    return advantages[:, None].expand_as(mask) if advantages.dim() == 1 else advantages


def common_metrics(
    token_ratio: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
) -> Metrics:
    """Clip shares over tokens and sequences, mean ratio, and KL(π_old ‖ π_θ).

    `clipped_low`/`clipped_high` are [B, T] token masks; `token_ratio` is the ratio the
    loss used for each token ([B, T]). With `advantages` ([B] or [B, T]) also the share of
    tokens whose advantage is not 0 (`adv/nonzero_fraction`) and the share of tokens both
    clipped and with a non-zero advantage (`clip/nonzero_adv_share`), both over all tokens so
    that micro-batches add up by token weight; `update_policy` divides the second by the first
    into `clip/fraction_nonzero_adv`.
    """
    with torch.no_grad():
        low, high = clipped_low.float() * mask, clipped_high.float() * mask
        any_clip = (low + high).clamp(max=1.0)
        log_ratio = (logp - old_logp).detach()
        # k3 estimator of KL(π_old ‖ π_θ) on samples from π_old: (r − 1) − log r ≥ 0.
        kl = torch.expm1(log_ratio) - log_ratio
        seq_clipped = (any_clip.sum(dim=1) > 0).float()
        signal = {}
        if advantages is not None:  # tokens of groups whose rewards all agreed have A = 0: no gradient to clip
            nonzero = (token_advantages(advantages.detach(), mask) != 0).float()
            signal = {"adv/nonzero_fraction": masked_mean(nonzero, mask),
                      "clip/nonzero_adv_share": masked_mean(any_clip * nonzero, mask)}
        return {
            **signal,
            "clip/fraction": masked_mean(any_clip, mask),
            "clip/low_fraction": masked_mean(low, mask),
            "clip/high_fraction": masked_mean(high, mask),
            "clip/seq_fraction": seq_clipped.mean(),
            "ratio/mean": masked_mean(token_ratio.detach(), mask),
            "kl/old_new": masked_mean(kl, mask),
        }


def per_sequence_metrics(seq_ratio, logp, old_logp, mask, low, high, advantages=None) -> Metrics:
    """`common_metrics` for a loss with one ratio and one clip decision per sequence."""
    expand = lambda x: x[:, None].expand_as(mask)  # noqa: E731
    metrics = common_metrics(expand(seq_ratio.detach()), logp, old_logp, mask, expand(low), expand(high),
                             advantages)
    metrics["ratio/seq_mean"] = seq_ratio.detach().mean()
    return metrics
