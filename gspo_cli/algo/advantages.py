"""Advantage estimators: rewards of a rollout batch in, one advantage per response out.

All estimators work on a [B, G] view of the rewards (B prompts, G responses each, the
responses of a prompt contiguous): a baseline is subtracted, then an optional scale divides.
"""

from __future__ import annotations

import torch

BASELINES = ("group-mean", "rloo")
SCALES = ("group-std", "batch-std", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B * G] -> [B, G] float view, checking that the groups divide the batch."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def group_baseline(grouped: torch.Tensor, baseline: str = "group-mean") -> torch.Tensor:
    """The baseline each reward is compared with.

    group-mean: the mean of the response's group, itself included (GRPO, eq. 6 of GSPO).
    rloo: the mean of the *other* G − 1 responses (leave-one-out, Ahmadian et al. 2024,
        arXiv 2402.14740), an unbiased baseline; r_i − b_i = G/(G − 1) · (r_i − mean).

    Args:
        grouped: [B, G] rewards.

    Returns:
        [B, G] baselines.
    """
    G = grouped.shape[1]
    if baseline == "group-mean":
        return grouped.mean(dim=1, keepdim=True)
    if baseline == "rloo":
        if G < 2:
            raise ValueError("the leave-one-out baseline needs trainer.group_size >= 2")
        return (grouped.sum(dim=1, keepdim=True) - grouped) / (G - 1)
    raise ValueError(f"algo.adv_baseline={baseline!r} is not one of {list(BASELINES)}")


def compute_advantages(
    rewards: torch.Tensor,
    group_size: int,
    baseline: str = "group-mean",
    scale: str = "group-std",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Reward minus a baseline, optionally divided by a standard deviation.

    scale: group-std divides by the (unbiased) std of the response's group (GRPO, GSPO);
    batch-std by the std of all rewards in the batch, so groups with little spread are not
    inflated (the "group mean, batch std" recipe of Liu et al. 2025, arXiv 2508.08221);
    none leaves the scale of the rewards (Dr. GRPO, arXiv 2503.20783, §3.1).
    A group whose rewards are all equal gets zero advantages under every option.

    Args:
        rewards: [B * G] rewards, the G responses of each prompt contiguous.
        group_size: G.
        baseline: one of `BASELINES`.
        scale: one of `SCALES`.
        eps: added to the std so constant groups give 0, not NaN.

    Returns:
        [B * G] advantages.
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    centered = grouped - group_baseline(grouped, baseline)
    if scale == "group-std":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(grouped)
        centered = centered / (std + eps)
    elif scale == "batch-std":
        std = grouped.std() if grouped.numel() > 1 else torch.ones(())
        centered = centered / (std + eps)
    elif scale != "none":
        raise ValueError(f"algo.adv_scale={scale!r} is not one of {list(SCALES)}")
    return centered.view(-1)
