"""DAPO's dynamic sampling (arXiv 2503.14476, §3.2): draw rollouts again until the batch holds
enough groups whose rewards differ.

Shapes: N = prompts × G sequences, the G responses of a prompt contiguous; T response tokens.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from gspo_cli.algo.batch_shaping import group_rows, informative_groups
from gspo_cli.rollout.batching import concat_rollouts, rollout_rows
from gspo_cli.rollout.generate import Rollout


class FilledBatch(NamedTuple):
    """What dynamic sampling hands back (N = num_groups × G)."""

    rollout: Rollout
    rewards: torch.Tensor  # [N]
    metrics: dict[str, float]
    warning: Optional[str]  # set when the refill cap was reached


def fill_with_informative_groups(
    draw: Callable[[], tuple[Rollout, torch.Tensor]],
    num_groups: int,
    group_size: int,
    max_refills: int,
    pad_token_id: int,
    any_rank_short: Callable[[bool], bool] = lambda short: short,
) -> FilledBatch:
    """DAPO's dynamic sampling: draw batches, keep the groups whose rewards differ, and draw
    again from new prompts until `num_groups` such groups are collected.

    At most `max_refills` extra draws follow the first, so a task the model always (or never)
    solves cannot loop forever; then the batch is topped up with zero-variance groups (they
    carry no gradient) so that its size stays fixed, and `warning` says so.

    Args:
        draw: samples and scores one batch of prompts: () -> (Rollout [N], rewards [N]).
        num_groups: groups wanted in the batch.
        group_size: G.
        max_refills: cap on extra draws.
        pad_token_id: pads rollouts of different widths when they are stacked.
        any_rank_short: with several processes, whether any rank still lacks groups, given this
            rank's answer (an all-reduce). Every rank fills its own share from its own prompts and
            draws until all ranks are full, so all draw the same number of times: the prompt
            stream stays aligned and FSDP2's collective forward passes stay in lockstep. A rank
            that is already full draws along and keeps only what it needs.

    Returns:
        `FilledBatch` with exactly `num_groups` groups (informative ones first), and metrics
        `sampling/informative_fraction` (of the first draw), `sampling/refills`.
    """
    kept, dropped, num_kept, first_fraction = [], [], 0, None
    for refill in range(max_refills + 1):
        rollout, rewards = draw()
        keep = informative_groups(rewards, group_size)  # [N / G]
        first_fraction = keep.float().mean().item() if first_fraction is None else first_fraction
        for chosen, store in ((keep, kept), (~keep, dropped)):
            rows = group_rows(chosen.nonzero().squeeze(1), group_size)
            if rows.numel():
                store.append((rollout_rows(rollout, rows), rewards[rows]))
        num_kept += int(keep.sum())
        if not any_rank_short(num_kept < num_groups):
            break
    warning = None
    if num_kept < num_groups:
        warning = (f"dynamic sampling: only {num_kept} of {num_groups} groups had rewards that differ after "
                   f"{max_refills} refill rounds (algo.max_refill_rounds); the batch was topped up with "
                   "groups of equal rewards, which carry no gradient. The task may be too easy or too hard "
                   "for the model; raise algo.max_refill_rounds or check the reward.")
    parts = kept + dropped
    rollout = concat_rollouts([r for r, _ in parts], pad_token_id)
    rewards = torch.cat([w for _, w in parts])
    rows = torch.arange(num_groups * group_size)
    metrics = {"sampling/informative_fraction": first_fraction, "sampling/refills": float(refill)}
    return FilledBatch(rollout_rows(rollout, rows), rewards[rows], metrics, warning)
