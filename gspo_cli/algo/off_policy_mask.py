"""Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556, eq. 9), an option of every loss.

A response with a negative advantage whose tokens the current policy finds, on average, much
less likely than the sampler did is left out of the loss: pushing such a response down further
is the update most likely to destabilise training, and its sample no longer describes the
policy being trained. With δ = `off_policy_mask_threshold` (`algo.params`), sequence i is kept
when A_i ≥ 0 or

    mean_t (log π_sampler(y_t) − log π_θ(y_t)) ≤ δ,

as TRL 1.16 computes it (`off_policy_mask_threshold`): log π_θ is the current policy's, detached;
π_sampler is the sampler's log-probabilities when the trainer passes them (`sampler_logp`), else
π_old. `with_off_policy_mask` wraps each registered loss; it also hands `sampler_logp` only to the
losses that name it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from gspo_cli.algo.loss_terms import LossFn, Metrics, masked_mean


def off_policy_keep(logp: torch.Tensor, sampler_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which sequences off-policy masking keeps.

    Args:
        logp, sampler_logp, mask: [B, T]; advantages: [B] or [B, T] (a row's sign is that of its
            mean over the response).
        threshold: δ.

    Returns:
        [B] float, 1.0 for a kept sequence (A ≥ 0 or mean KL ≤ δ), 0.0 for a masked one.
    """
    with torch.no_grad():
        seq_kl = masked_mean(sampler_logp - logp.detach(), mask, dim=1)  # [B]
        seq_adv = advantages if advantages.dim() == 1 else masked_mean(advantages, mask, dim=1)
        return ((seq_adv >= 0) | (seq_kl <= threshold)).to(mask.dtype)


def with_off_policy_mask(loss_fn: LossFn) -> LossFn:
    """`loss_fn` with `off_policy_mask_threshold` (None: off) and `sampler_logp` handled.

    A masked sequence's tokens are taken out of `mask` and its advantage set to 0, so it adds
    nothing to the loss, its gradient or the token metrics, while the normalisation stays that of
    the whole batch: the global counts the trainer passes, or this batch's own (tokens, sequences)
    when called without them.
    `mask/off_policy_fraction` is the share of sequences masked.
    """
    takes_sampler_logp = "sampler_logp" in inspect.signature(loss_fn).parameters

    @functools.wraps(loss_fn)
    def wrapped(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *args, sampler_logp: Optional[torch.Tensor] = None,
                off_policy_mask_threshold: Optional[float] = None, **kwargs) -> tuple[torch.Tensor, Metrics]:
        if takes_sampler_logp:
            kwargs["sampler_logp"] = sampler_logp
        if off_policy_mask_threshold is None:
            return loss_fn(logp, old_logp, advantages, mask, *args, **kwargs)
        reference = old_logp if sampler_logp is None else sampler_logp
        keep = off_policy_keep(logp, reference, advantages, mask, off_policy_mask_threshold)  # [B]
        kwargs.setdefault("num_tokens", mask.sum())
        kwargs.setdefault("num_seqs", mask.shape[0])
        # Masked rows lose their tokens and their advantage: a per-sequence term (GSPO's) is not
        # weighted by the row's token count under seq-mean-token-mean, and A = 0 makes it 0.
        advantages = advantages * (keep if advantages.dim() == 1 else keep[:, None])
        loss, metrics = loss_fn(logp, old_logp, advantages, mask * keep[:, None], *args, **kwargs)
        metrics["mask/off_policy_fraction"] = 1.0 - keep.mean()
        return loss, metrics

    return wrapped
