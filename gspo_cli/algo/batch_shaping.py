"""DAPO's batch shaping (arXiv 2503.14476) as tensor functions: which groups carry a learning
signal (dynamic sampling, §3.2) and the soft overlong penalty on responses near the limit (§3.4).

Shapes: N = prompts × G sequences, the G responses of a prompt contiguous.
"""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards -> [N / G] bool: groups whose rewards are not all equal.

    A group of equal rewards has zero group-relative advantages, so it adds no gradient but
    still dilutes the batch (DAPO §3.2).
    """
    grouped = rewards.view(-1, group_size)
    return grouped.max(dim=1).values > grouped.min(dim=1).values


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the sequences of the given groups: [K] -> [K · G]."""
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: float, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (§3.4), added to the reward.

    0 for responses of at most max_len − buffer tokens, then falling linearly to −penalty at
    max_len (a response cut off by the limit gets the full −penalty).

    Args:
        lengths: [N] response lengths in tokens (end-of-sequence included).
        max_len: the generation limit (trainer.max_new_tokens).
        buffer: the length of the penalty interval, in tokens (DAPO: 4096 of 20480).

    Returns:
        [N] penalties, ≤ 0.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0, max=buffer)
    return -penalty * over / buffer
