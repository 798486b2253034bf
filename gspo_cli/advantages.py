"""Advantage estimators: rewards of a rollout batch in, one advantage per response out."""

from __future__ import annotations

import torch


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages (GRPO / GSPO, paper eq. 6).

    Responses to the same prompt form a group; each advantage is the reward minus the
    group mean, divided by the group standard deviation when `scale_std` is set.
    A group whose rewards are all equal gets zero advantages: it carries no signal.

    Args:
        rewards: [B * G] rewards, the G responses of each prompt contiguous.
        group_size: G.
        scale_std: divide by the (unbiased) standard deviation of the group.
        eps: added to the standard deviation so constant groups give 0, not NaN.

    Returns:
        [B * G] advantages.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(grouped)
        centered = centered / (std + eps)
    return centered.view(-1)
