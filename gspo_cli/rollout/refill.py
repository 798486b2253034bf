"""DAPO's dynamic sampling (arXiv 2503.14476, §3.2): draw rollouts again until the batch holds
enough groups whose rewards differ, and the rollout-batch operations it needs (rows, stacking).

Shapes: N = prompts × G sequences, the G responses of a prompt contiguous; T response tokens.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from gspo_cli.algo.batch_shaping import group_rows, informative_groups
from gspo_cli.rollout.generate import Rollout

_TOKEN_FIELDS = ("logp", "entropy")  # [N, T] fields of a Rollout besides the response mask


class FilledBatch(NamedTuple):
    """What dynamic sampling hands back (N = num_groups × G)."""

    rollout: Rollout
    rewards: torch.Tensor  # [N]
    metrics: dict[str, float]
    warning: Optional[str]  # set when the refill cap was reached


def rollout_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The sub-batch of the given sequences (rows: [K] indices)."""
    picked = {name: (None if value is None else value[rows]) for name, value in rollout._asdict().items()
              if name not in ("completions", "routes")}
    routes = None if rollout.routes is None else [layer[rows] for layer in rollout.routes]
    return Rollout(**picked, completions=[rollout.completions[i] for i in rows.tolist()], routes=routes)


def pad_routes(layer: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """[N, P + T, k] routes padded like the tokens: `left` columns before the prompt, `right`
    after the response. Padding positions are masked out everywhere; they get experts
    0..k-1, a valid choice, so that Routing Replay can force them like any other."""
    filler = torch.arange(layer.shape[-1], device=layer.device).expand(layer.shape[0], 1, -1)
    return torch.cat([filler.expand(-1, left, -1), layer, filler.expand(-1, right, -1)], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts of different prompt (P) and response (T) widths into one batch.

    Prompts are left-padded to the widest prompt and responses right-padded to the longest
    response, which keeps the layout `[prompt (left pad) | response (right pad)]`.
    """
    unknown = set(Rollout._fields) - {"input_ids", "attention_mask", "response_mask", "completions", "routes",
                                      "truncated", *_TOKEN_FIELDS}
    if unknown:
        raise NotImplementedError(f"concat_rollouts does not know how to pad the Rollout fields {sorted(unknown)}")
    widths = [(r.input_ids.shape[1] - r.response_mask.shape[1], r.response_mask.shape[1]) for r in rollouts]
    P, T = max(p for p, _ in widths), max(t for _, t in widths)

    ids, attn, resp, routes = [], [], [], []
    tokens = {name: [] for name in _TOKEN_FIELDS}
    for r, (p, t) in zip(rollouts, widths):
        routes.append(None if r.routes is None else [pad_routes(layer, P - p, T - t) for layer in r.routes])
        ids.append(torch.cat([F.pad(r.input_ids[:, :p], (P - p, 0), value=pad_token_id),
                              F.pad(r.input_ids[:, p:], (0, T - t), value=pad_token_id)], dim=1))
        attn.append(torch.cat([F.pad(r.attention_mask[:, :p], (P - p, 0), value=0),
                               F.pad(r.attention_mask[:, p:], (0, T - t), value=0)], dim=1))
        resp.append(F.pad(r.response_mask, (0, T - t), value=0.0))
        for name in _TOKEN_FIELDS:
            value = getattr(r, name)
            tokens[name].append(None if value is None else F.pad(value, (0, T - t), value=0.0))
    return Rollout(
        input_ids=torch.cat(ids), attention_mask=torch.cat(attn), response_mask=torch.cat(resp),
        completions=[c for r in rollouts for c in r.completions],
        **{name: None if any(v is None for v in values) else torch.cat(values) for name, values in tokens.items()},
        routes=None if any(r is None for r in routes) else [torch.cat(layer) for layer in zip(*routes)],
        truncated=None if any(r.truncated is None for r in rollouts) else torch.cat([r.truncated for r in rollouts]),
    )


def fill_with_informative_groups(
    draw: Callable[[], tuple[Rollout, torch.Tensor]],
    num_groups: int,
    group_size: int,
    max_refills: int,
    pad_token_id: int,
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
        if num_kept >= num_groups:
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
