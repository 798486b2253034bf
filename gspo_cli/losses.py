"""Policy-gradient losses: GSPO, its token-level form, and the GRPO baseline.

Every loss has one signature and is registered by name in `LOSSES`:

    loss, metrics = LOSSES[name](logp, old_logp, advantages, mask, clip_low=..., clip_high=...)

Shapes: B sequences (responses), T response tokens (right-padded).
    logp       [B, T]  log π_θ(y_t | x, y_<t), with gradient
    old_logp   [B, T]  log π_old(y_t | x, y_<t) from the rollout policy, no gradient
    advantages [B]     one advantage per response (gspo-token also takes [B, T])
    mask       [B, T]  1.0 on response tokens, 0.0 on padding

`loss` is a scalar to minimise; `metrics` holds detached scalar tensors under the names
the trainer logs (`clip/fraction`, `ratio/mean`, ...). "Clipped" means the clip is active,
that is the clipped term is the one `min` selects and the gradient of that token vanishes;
for sequence-level losses every token of a clipped sequence counts as clipped, which makes
`clip/fraction` (a share of tokens) comparable between GSPO and GRPO as in the paper's Fig. 4.
"""

from __future__ import annotations

from typing import Callable

import torch

Metrics = dict[str, torch.Tensor]
LossFn = Callable[..., tuple[torch.Tensor, Metrics]]


# ---------------------------------------------------------------------------- helpers


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1, over `dim` (all elements when None)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over each sequence's tokens, then over sequences ([B, T] -> scalar)."""
    return masked_mean(per_token, mask, dim=1).mean()


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) Σ_t (log π_θ − log π_old): the log of GSPO's length-normalised ratio.

    Args:
        logp, old_logp, mask: [B, T].

    Returns:
        [B] log sequence ratios.
    """
    return masked_mean(logp - old_logp, mask, dim=1)


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


def _common_metrics(
    token_ratio: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
) -> Metrics:
    """Clip shares over tokens and sequences, mean ratio, and KL(π_old ‖ π_θ).

    `clipped_low`/`clipped_high` are [B, T] token masks; `token_ratio` is the ratio the
    loss used for each token ([B, T]).
    """
    with torch.no_grad():
        low, high = clipped_low.float() * mask, clipped_high.float() * mask
        any_clip = (low + high).clamp(max=1.0)
        log_ratio = (logp - old_logp).detach()
        # k3 estimator of KL(π_old ‖ π_θ) on samples from π_old: (r − 1) − log r ≥ 0.
        kl = torch.expm1(log_ratio) - log_ratio
        seq_clipped = (any_clip.sum(dim=1) > 0).float()
        return {
            "clip/fraction": masked_mean(any_clip, mask),
            "clip/low_fraction": masked_mean(low, mask),
            "clip/high_fraction": masked_mean(high, mask),
            "clip/seq_fraction": seq_clipped.mean(),
            "ratio/mean": masked_mean(token_ratio.detach(), mask),
            "kl/old_new": masked_mean(kl, mask),
        }


# ---------------------------------------------------------------------------- losses


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (paper eq. 5): clip the length-normalised sequence ratio, average over sequences.

    s_i = exp(mean_t(log π_θ − log π_old)) is one number per response, so every token of a
    response gets the same weight and a whole response is either clipped or not.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B].
        clip_low, clip_high: the sequence ratio is clipped to [1 − clip_low, 1 + clip_high]
            (paper defaults 3e-4 / 4e-4, §5.1).
    """
    seq_ratio = torch.exp(sequence_log_ratio(logp, old_logp, mask))  # [B]
    per_seq, low, high = clipped_surrogate(seq_ratio, advantages, clip_low, clip_high)
    loss = per_seq.mean()
    token_ratio = seq_ratio.detach()[:, None].expand_as(mask)
    metrics = _common_metrics(
        token_ratio, logp, old_logp, mask, low[:, None].expand_as(mask), high[:, None].expand_as(mask)
    )
    metrics["ratio/seq_mean"] = seq_ratio.detach().mean()
    return loss, metrics


def gspo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO-token (paper eq. 13): per-token advantages with the sequence ratio's value.

    s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]: numerically s_i for every token, but its
    gradient flows through each token's own log-probability, so a token-level advantage
    A_{i,t} can weight each token. With A_{i,t} = A_i this equals `gspo_loss` in value and
    gradient.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
    """
    seq_log_ratio = sequence_log_ratio(logp, old_logp, mask)  # [B]
    token_ratio = torch.exp(logp - logp.detach() + seq_log_ratio.detach()[:, None])  # [B, T]
    token_adv = advantages[:, None].expand_as(mask) if advantages.dim() == 1 else advantages
    per_token, low, high = clipped_surrogate(token_ratio, token_adv, clip_low, clip_high)
    loss = seq_mean_token_mean(per_token, mask)
    metrics = _common_metrics(token_ratio, logp, old_logp, mask, low, high)
    metrics["ratio/seq_mean"] = seq_log_ratio.detach().exp().mean()
    return loss, metrics


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.27,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO (paper eq. 2): per-token ratio π_θ(y_t)/π_old(y_t), clipped per token.

    Per-token losses are averaged within each response, then over responses.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B].
        clip_low, clip_high: per-token clip range (the paper's tuned baseline: 0.2 / 0.27).
    """
    token_ratio = torch.exp(logp - old_logp)  # [B, T]
    token_adv = advantages[:, None].expand_as(mask)
    per_token, low, high = clipped_surrogate(token_ratio, token_adv, clip_low, clip_high)
    loss = seq_mean_token_mean(per_token, mask)
    return loss, _common_metrics(token_ratio, logp, old_logp, mask, low, high)


LOSSES: dict[str, LossFn] = {
    "gspo": gspo_loss,
    "gspo-token": gspo_token_loss,
    "grpo": grpo_loss,
}
