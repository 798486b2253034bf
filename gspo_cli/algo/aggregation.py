"""Loss aggregation: per-token or per-sequence losses to one scalar, aware of data-parallel shards.

One pure function, `aggregate`, implements every normalisation the policy losses use, so a
loss never hard-codes its own; `algo.loss_agg` picks the mode.
"""

from __future__ import annotations

from typing import Optional

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SEQUENCE_RATIO_LOSSES = ("gspo", "gspo-token", "gmpo")
"""Losses whose importance ratio is one number per sequence (for the aggregation warning)."""


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "seq-mean-token-mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    horizon: Optional[float] = None,
    num_shards: int = 1,
) -> torch.Tensor:
    """Reduce per-token or per-sequence losses to the scalar to minimise.

    With L_i = Σ_t ℓ_{i,t} (a per-sequence term ℓ_i counts once per token: L_i = |y_i| ℓ_i):
        token-mean               Σ_i L_i / N_tokens             (DAPO, CISPO)
        seq-mean-token-mean      Σ_i (L_i / |y_i|) / N_seqs     (GRPO, GSPO)
        seq-mean-token-sum       Σ_i L_i / N_seqs
        seq-mean-token-sum-norm  Σ_i L_i / (N_seqs · H)         (Dr. GRPO, H = max length)

    Data parallelism: give every shard the *global* `num_tokens` and `num_seqs` and the
    number of shards; each shard's value is then scaled so that the mean over shards (what
    averaging gradients across ranks computes) equals the value on the whole batch.

    Args:
        values: [B, T] per-token or [B] per-sequence losses.
        mask: [B, T] response mask.
        mode: one of `AGGREGATIONS`.
        num_tokens: response tokens in the whole batch (default: this shard's, mask.sum()).
        num_seqs: sequences in the whole batch (default: B).
        horizon: H of seq-mean-token-sum-norm (default: T, the padded length).
        num_shards: shards whose values are averaged.

    Returns:
        Scalar loss.
    """
    lengths = mask.sum(1)  # [B]
    if values.dim() == 1:  # a row without a token (masked out entirely) contributes nothing
        seq_sum, seq_mean = values * lengths, torch.where(lengths > 0, values, 0.0)  # [B]
    else:
        seq_sum = torch.where(mask.bool(), values, 0.0).sum(1)  # selected, not · mask: NaN · 0 = NaN
        seq_mean = seq_sum / lengths.clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        # .mean() when no global count is given: the same number, bit for bit the slice's loss.
        if num_seqs is None and num_shards == 1:
            return seq_mean.mean()
        return seq_mean.sum() * num_shards / (num_seqs or values.shape[0])
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else lengths.sum().clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        denom = num_seqs or values.shape[0]
    elif mode == "seq-mean-token-sum-norm":
        denom = (num_seqs or values.shape[0]) * (horizon or mask.shape[1])
    else:
        raise ValueError(f"loss_agg={mode!r} is not one of {list(AGGREGATIONS)}")
    return seq_sum.sum() * num_shards / denom


def aggregation_warning(loss: str, mode: str) -> Optional[str]:
    """The known pitfall of a sequence-level ratio under a token-sum aggregation, or None.

    A sequence ratio already averages over the response's tokens; summing its loss over the
    tokens multiplies each sequence by its length, so long responses dominate the update.
    """
    if loss in SEQUENCE_RATIO_LOSSES and mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        return (f"algo.loss={loss} uses a sequence-level ratio; with algo.loss_agg={mode} each "
                "sequence's loss is weighted by its length. Use seq-mean-token-mean unless you "
                "mean to do that.")
    return None
