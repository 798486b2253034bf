"""The trainer's forward passes over rows of a rollout batch: micro-batches planned by rows and
by padded tokens, padding trimmed, MoE routes captured or replayed in the batch's layout.

Every trainer pass (the update's, π_old's, the reference's, the volatility probe's) runs
through `plan_micro_batches` and `score_rows`. A rollout batch is padded to its longest prompt
and longest response (`[prompt (left pad) | response (right pad)]`, P + T columns); a pass over
some rows only needs the columns where those rows have tokens, so each micro-batch is cut to
that window (positions come from the attention mask, attention is causal: the numbers are
those of the full-width pass, to float rounding) and its log-probabilities are padded back to T.

With `trainer.micro_batch_tokens` the rows are sorted by length and packed so that each pass
holds at most that many (padded) tokens, as verl's dynamic batch size does: a long-tailed
batch then costs its tokens, not rows × the longest response. Under several processes every
rank runs the same number of passes (FSDP2 gathers parameters per pass; DDP reduces per
backward), the largest any rank needs.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from gspo_cli.models.routing import Routes, route_rows, routes_by_sequence
from gspo_cli.rollout.batching import pad_routes
from gspo_cli.rollout.generate import Rollout
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.distributed import all_reduce_max


class MicroBatch(NamedTuple):
    """Rows of the batch that run in one pass, and the columns [start, stop) that hold their tokens."""

    rows: torch.Tensor  # [n] row indices into the rollout batch
    start: int  # first column with a token of any of these rows (the longest prompt's first)
    stop: int  # one past the last column with a token (the longest response's last)


def pack_rows(prompt_lengths: Sequence[int], response_lengths: Sequence[int], max_rows: int,
              max_tokens: int) -> list[list[int]]:
    """Group row positions into passes of at most `max_rows` rows and `max_tokens` padded tokens.

    A pass over rows i ∈ S holds |S| · (max_S P_i + max_S T_i) tokens (left-padded prompts,
    right-padded responses). With `max_tokens` > 0 the rows are sorted by length, longest first,
    and packed greedily (a row longer than the budget runs alone); with 0, consecutive rows
    `max_rows` at a time in the given order (0: all rows in one pass).

    Args:
        prompt_lengths, response_lengths: [n] real tokens of each row.

    Returns:
        Lists of positions 0..n-1, each position once.
    """
    n = len(prompt_lengths)
    if max_tokens <= 0:
        size = max_rows if max_rows > 0 else max(n, 1)
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    order = sorted(range(n), key=lambda i: prompt_lengths[i] + response_lengths[i], reverse=True)
    passes: list[list[int]] = []
    prompt_max = response_max = 0
    for i in order:
        p, t = max(prompt_max, prompt_lengths[i]), max(response_max, response_lengths[i])
        fits = passes and (len(passes[-1]) + 1) * (p + t) <= max_tokens and (
            max_rows <= 0 or len(passes[-1]) < max_rows)
        if fits:
            passes[-1].append(i)
            prompt_max, response_max = p, t
        else:
            passes.append([i])
            prompt_max, response_max = prompt_lengths[i], response_lengths[i]
    return passes


def split_to_count(passes: list[list[int]], count: int, prompt_lengths: Sequence[int],
                   response_lengths: Sequence[int]) -> list[list[int]]:
    """Split the costliest passes in two until there are `count` of them (the passes of the rank
    that needs the most; every pass keeps at least one row, so `count` ≤ rows is required)."""
    passes = [list(p) for p in passes]

    def cost(rows: list[int]) -> int:
        return len(rows) * (max(prompt_lengths[i] for i in rows) + max(response_lengths[i] for i in rows))

    while len(passes) < count:
        splittable = [p for p in passes if len(p) > 1]
        if not splittable:
            raise ValueError(f"cannot run {sum(map(len, passes))} rows in {count} passes")
        largest = max(splittable, key=cost)
        at = passes.index(largest)
        passes[at:at + 1] = [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return passes


def window(attention_mask: torch.Tensor, num_response_tokens: int) -> tuple[int, int]:
    """Columns [start, stop) of `attention_mask` ([n, P + T]) that hold every real token; at
    least one response column, so a pass always predicts something."""
    columns = attention_mask.bool().any(0).nonzero().flatten()
    first_response = attention_mask.shape[1] - num_response_tokens
    if columns.numel() == 0:
        return first_response - 1, first_response + 1
    return int(columns[0]), max(int(columns[-1]) + 1, first_response + 1)


def plan_micro_batches(rollout: Rollout, rows: torch.Tensor, max_rows: int, max_tokens: int,
                       env=None) -> list[MicroBatch]:
    """The passes over `rows` ([n] indices): packed by `pack_rows`, as many on every rank as the
    rank that needs the most (`env`: the ranks to agree with; None: one process)."""
    if rows.numel() == 0:
        return []
    T = rollout.response_mask.shape[1]
    P = rollout.input_ids.shape[1] - T
    attention = rollout.attention_mask[rows]
    prompt_lengths = attention[:, :P].sum(1).long().tolist()
    response_lengths = attention[:, P:].sum(1).long().tolist()
    passes = pack_rows(prompt_lengths, response_lengths, max_rows, max_tokens)
    if env is not None and env.distributed and max_tokens > 0:  # row chunks already agree in number
        count = int(all_reduce_max(torch.tensor([float(len(passes))]), env).item())
        passes = split_to_count(passes, count, prompt_lengths, response_lengths)
    micro_batches = []
    for positions in passes:
        picked = rows[torch.tensor(positions, dtype=torch.long)]
        micro_batches.append(MicroBatch(picked, *window(rollout.attention_mask[picked], T)))
    return micro_batches


def score_rows(model, rollout: Rollout, micro: MicroBatch, temperature: float, chunk_tokens: int,
               routing=None) -> tuple[torch.Tensor, Optional[Routes]]:
    """log π [n, T] of the micro-batch's responses (with gradient if enabled), computed on its
    window and padded back to the batch's T columns (0 on the columns outside it), and, with
    `routing` (an `MoERouting`), the experts each layer chose, per layer [n, P + T, k] in the
    batch's layout (columns outside the window get experts 0..k-1, as padding does)."""
    T, width = rollout.response_mask.shape[1], rollout.input_ids.shape[1]
    ids = rollout.input_ids[micro.rows, micro.start:micro.stop]
    attention = rollout.attention_mask[micro.rows, micro.start:micro.stop]
    response_columns = micro.stop - (width - T)
    with routing.capture() if routing is not None else contextlib.nullcontext() as captured:
        logp = response_logprobs(model, ids, attention, response_columns, temperature, chunk_tokens)
    logp = F.pad(logp, (0, T - response_columns))  # [n, T]
    if captured is None:
        return logp, None
    routes = [pad_routes(layer, micro.start, width - micro.stop)
              for layer in routes_by_sequence(list(captured), len(micro.rows))]
    return logp, routes


def replaying(routing, routes: Optional[Routes], micro: MicroBatch):
    """A context forcing the given experts (per layer [n, P + T, k], the micro-batch's rows in the
    batch's layout) on the micro-batch's window; keep it open through the backward pass, where
    gradient checkpointing runs each layer's forward again. No routes: nothing is forced."""
    if routing is None or routes is None:
        return contextlib.nullcontext()
    windowed = [layer[:, micro.start:micro.stop] for layer in routes]
    return routing.replay(route_rows(windowed, torch.arange(len(micro.rows), device=micro.rows.device)))
