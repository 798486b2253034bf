"""Policy-gradient losses: GSPO, its token-level form, GRPO and the variants it is compared with,
and the registry of every loss (the follow-ups of `followup_losses.py` included).

Every loss has one signature and is registered by name in `LOSSES`:

    loss, metrics = LOSSES[name](logp, old_logp, advantages, mask, clip_low=..., clip_high=...,
                                 loss_agg=..., is_weights=..., **params)

Shapes: B sequences (responses), T response tokens (right-padded).
    logp       [B, T]  log π_θ(y_t | x, y_<t), with gradient
    old_logp   [B, T]  log π_old(y_t | x, y_<t) from the rollout policy, no gradient
    advantages [B]     one advantage per response (gspo-token also takes [B, T])
    mask       [B, T]  1.0 on response tokens, 0.0 on padding
    is_weights [B, T]  optional detached importance weights (truncated IS for the gap between
                       sampler and trainer); sequence-level losses use their geometric mean
    sampler_logp [B, T] optional, the sampler's log-probabilities; passed on to the losses
                       that name it (icepop) and read by off-policy masking
Values at padding positions are never read: `padding_neutral` replaces them before any
arithmetic, so a NaN or inf left there cannot reach the loss or its gradient.

Each loss turns its per-token ([B, T]) or per-sequence ([B]) terms into one scalar with
`aggregation.aggregate` under `loss_agg`; keyword arguments a loss does not name (the global counts
`num_tokens`, `num_seqs`, `horizon`, `num_shards`) go to `aggregate`.

`loss` is a scalar to minimise; `metrics` holds detached scalar tensors under the names
the trainer logs (`clip/fraction`, `ratio/mean`, ...). "Clipped" means the clip is active,
that is the clipped term is the one `min` selects and the gradient of that token vanishes;
for sequence-level losses every token of a clipped sequence counts as clipped, which makes
`clip/fraction` (a share of tokens) comparable between GSPO and GRPO as in the paper's Fig. 2.
CISPO and SAPO never zero a gradient; their `clip/*` metrics count the tokens whose weight
the method cuts: CISPO's truncated importance weights, and SAPO's tokens whose soft gate has
damped the gradient to less than half (see each loss).
"""

from __future__ import annotations

from typing import Optional

import torch

from gspo_cli.algo.aggregation import aggregate
from gspo_cli.algo.followup_losses import (
    clip_cov_loss,
    dppo_loss,
    icepop_loss,
    kl_cov_loss,
    luspo_loss,
    vespo_loss,
)
from gspo_cli.algo.loss_terms import (  # noqa: F401  (masked_mean, Metrics, ... are imported from here too)
    LossFn,
    Metrics,
    clipped_surrogate,
    common_metrics,
    masked_mean,
    padding_neutral,
    per_sequence_metrics,
    sequence_log_ratio,
    sequence_surrogate,
    sequence_weights,
    token_advantages,
    weighted,
)
from gspo_cli.algo.off_policy_mask import with_off_policy_mask


# ---------------------------------------------------------------------------- sequence-ratio losses


@padding_neutral
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    *,
    loss_agg: str = "seq-mean-token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (paper eq. 5): clip the length-normalised sequence ratio, average over sequences.

    s_i = exp(mean_t(log π_θ − log π_old)) is one number per response, so every token of a
    response gets the same weight and a whole response is either clipped or not.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B].
        clip_low, clip_high: the sequence ratio is clipped to [1 − clip_low, 1 + clip_high]
            (paper defaults 3e-4 / 4e-4, §5.1).
        loss_agg, agg: see `aggregate`; the paper's is seq-mean-token-mean.
        is_weights: [B, T] or None; their per-sequence geometric mean weights each sequence.
    """
    per_seq, seq_ratio, low, high = sequence_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    loss = aggregate(weighted(per_seq, sequence_weights(is_weights, mask)), mask, loss_agg, **agg)
    return loss, per_sequence_metrics(seq_ratio, logp, old_logp, mask, low, high, advantages=advantages)


@padding_neutral
def gspo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    *,
    loss_agg: str = "seq-mean-token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO-token (paper eq. 13): per-token advantages with the sequence ratio's value.

    s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]: numerically s_i for every token, but its
    gradient flows through each token's own log-probability, so a token-level advantage
    A_{i,t} can weight each token. With A_{i,t} = A_i this equals `gspo_loss` in value and
    gradient, under every aggregation.

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
    """
    seq_log_ratio = sequence_log_ratio(logp, old_logp, mask)  # [B]
    token_ratio = torch.exp(logp - logp.detach() + seq_log_ratio.detach()[:, None])  # [B, T]
    per_token, low, high = clipped_surrogate(token_ratio, token_advantages(advantages, mask), clip_low, clip_high)
    seq_w = sequence_weights(is_weights, mask)
    loss = aggregate(weighted(per_token, None if seq_w is None else seq_w[:, None]), mask, loss_agg, **agg)
    metrics = common_metrics(token_ratio, logp, old_logp, mask, low, high, advantages=advantages)
    metrics["ratio/seq_mean"] = seq_log_ratio.detach().exp().mean()
    return loss, metrics


@padding_neutral
def gmpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.4,
    clip_high: float = 0.4,
    *,
    loss_agg: str = "seq-mean-token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """GMPO (arXiv 2507.20673): the geometric mean of token ratios, each clipped in log space.

    Each token's log-ratio is clipped to [−clip_low, clip_high] *before* the geometric mean,
    pessimistically as PPO does (for A > 0 the smaller, for A < 0 the larger of clipped and
    unclipped), then −A_i · exp(mean_t clipped log-ratio) is the sequence's loss. A clipped
    token contributes no gradient; the others keep theirs.

    Args:
        clip_low, clip_high: log-space bounds (the paper's (e^−0.4, e^0.4), §4).
    """
    log_ratio = logp - old_logp  # [B, T]
    sign = torch.sign(advantages)[:, None]  # [B, 1]
    clamped = log_ratio.clamp(-clip_low, clip_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clamped)
    seq_ratio = torch.exp(masked_mean(pessimistic, mask, dim=1))  # [B]
    per_seq = -advantages * seq_ratio
    loss = aggregate(weighted(per_seq, sequence_weights(is_weights, mask)), mask, loss_agg, **agg)
    low = (sign < 0) & (log_ratio < -clip_low)
    high = (sign > 0) & (log_ratio > clip_high)
    metrics = common_metrics(torch.exp(log_ratio), logp, old_logp, mask, low, high, advantages=advantages)
    metrics["ratio/seq_mean"] = seq_ratio.detach().mean()
    return loss, metrics


# ---------------------------------------------------------------------------- token-ratio losses


@padding_neutral
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.27,
    *,
    loss_agg: str = "seq-mean-token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO (paper eq. 2): per-token ratio π_θ(y_t)/π_old(y_t), clipped per token.

    Per-token losses are averaged within each response, then over responses (by default).

    Args:
        logp, old_logp, mask: [B, T]; advantages: [B] or [B, T].
        clip_low, clip_high: per-token clip range (the paper's tuned baseline: 0.2 / 0.27).
    """
    token_ratio = torch.exp(logp - old_logp)  # [B, T]
    per_token, low, high = clipped_surrogate(token_ratio, token_advantages(advantages, mask), clip_low, clip_high)
    loss = aggregate(weighted(per_token, is_weights), mask, loss_agg, **agg)
    return loss, common_metrics(token_ratio, logp, old_logp, mask, low, high, advantages=advantages)


def dr_grpo_loss(logp, old_logp, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.27, *,
                 loss_agg: str = "seq-mean-token-sum-norm", **kwargs) -> tuple[torch.Tensor, Metrics]:
    """Dr. GRPO (arXiv 2503.20783): GRPO's surrogate, token losses summed and divided by a
    constant (B · max response length) instead of each response's length; its other change,
    no std scaling of advantages, lives in `advantages.py` (`algo.adv_scale=none`)."""
    return grpo_loss(logp, old_logp, advantages, mask, clip_low, clip_high, loss_agg=loss_agg, **kwargs)


def dapo_loss(logp, old_logp, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.28, *,
              loss_agg: str = "token-mean", **kwargs) -> tuple[torch.Tensor, Metrics]:
    """DAPO (arXiv 2503.14476): GRPO's surrogate with clip-higher (0.2 / 0.28, §3.1) and
    token-mean aggregation over the batch (§3.3); dynamic sampling and the overlong penalty
    act on the rollout batch (`algo/batch_shaping.py`, `rollout/refill.py`)."""
    return grpo_loss(logp, old_logp, advantages, mask, clip_low, clip_high, loss_agg=loss_agg, **kwargs)


@padding_neutral
def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    *,
    loss_agg: str = "token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): −sg[clip(r_t, 1−ε_low, 1+ε_high)] · A · log π_θ(y_t).

    The importance weight is clipped and detached, and multiplies the log-probability, so
    a token whose ratio left the range keeps a (capped) gradient instead of none.
    "Clipped" tokens (`clip/*`) are those whose weight was truncated, whatever the sign of A.

    Args:
        clip_low: 1.0 puts no lower bound on the weight, as the paper does.
        clip_high: upper truncation of the weight.
    """
    token_ratio = torch.exp(logp - old_logp)  # [B, T]
    weight = token_ratio.detach().clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -weight * token_advantages(advantages, mask) * logp
    loss = aggregate(weighted(per_token, is_weights), mask, loss_agg, **agg)
    low, high = token_ratio < 1.0 - clip_low, token_ratio > 1.0 + clip_high
    return loss, common_metrics(token_ratio, logp, old_logp, mask, low, high, advantages=advantages)


@padding_neutral
def sapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.0,
    clip_high: float = 0.0,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    loss_agg: str = "seq-mean-token-mean",
    is_weights: Optional[torch.Tensor] = None,
    **agg,
) -> tuple[torch.Tensor, Metrics]:
    """SAPO (arXiv 2511.20347): a soft sigmoid gate in place of the hard clip.

    Per token: −A · f(r) with f(r) = σ(τ (r − 1)) · 4/τ, τ = tau_pos for A > 0 and tau_neg
    otherwise. df/dr = 4 σ(1 − σ) is 1 at r = 1 (REINFORCE) and decays smoothly as r leaves 1
    on either side; τ_neg > τ_pos damps negative updates faster (paper defaults 1.0 / 1.05).
    There is no clip range (clip_low/clip_high are accepted and unused). A token counts as
    "clipped" when its gate weight 4σ(1 − σ) is below 1/2, i.e. its gradient is at least halved;
    `gate/weight_mean` is the mean of that weight.
    """
    token_ratio = torch.exp(logp - old_logp)  # [B, T]
    token_adv = token_advantages(advantages, mask)
    tau = torch.where(token_adv > 0, torch.full_like(token_adv, tau_pos), torch.full_like(token_adv, tau_neg))
    gate = torch.sigmoid(tau * (token_ratio - 1.0))
    per_token = -token_adv * gate * 4.0 / tau
    loss = aggregate(weighted(per_token, is_weights), mask, loss_agg, **agg)
    weight = (4.0 * gate * (1.0 - gate)).detach()
    damped = weight < 0.5
    metrics = common_metrics(token_ratio, logp, old_logp, mask, damped & (token_ratio < 1), damped & (token_ratio > 1),
                             advantages=advantages)
    metrics["gate/weight_mean"] = masked_mean(weight, mask)
    return loss, metrics


LOSSES: dict[str, LossFn] = {name: with_off_policy_mask(loss_fn) for name, loss_fn in {
    "gspo": gspo_loss,
    "gspo-token": gspo_token_loss,
    "gmpo": gmpo_loss,
    "grpo": grpo_loss,
    "dr-grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
    # GSPO's follow-ups (followup_losses.py)
    "luspo": luspo_loss,
    "vespo": vespo_loss,
    "icepop": icepop_loss,
    "dppo": dppo_loss,
    "clip-cov": clip_cov_loss,
    "kl-cov": kl_cov_loss,
}.items()}
"""Every loss by name; each also takes `off_policy_mask_threshold` (`off_policy_mask.py`)."""
