"""Rollout batches: the rows of one, and several stacked into one (generation in chunks,
dynamic sampling). Shapes: N sequences, P prompt and T response columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gspo_cli.rollout.generate import Rollout

_TOKEN_FIELDS = ("logp", "entropy")  # [N, T] fields of a Rollout besides the response mask


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
    filler = torch.arange(layer.shape[-1], device=layer.device, dtype=layer.dtype).expand(layer.shape[0], 1, -1)
    return torch.cat([filler.expand(-1, left, -1), layer, filler.expand(-1, right, -1)], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts of different prompt (P) and response (T) widths into one batch.

    Prompts are left-padded to the widest prompt and responses right-padded to the longest
    response, which keeps the layout `[prompt (left pad) | response (right pad)]`.
    """
    if len(rollouts) == 1:
        return rollouts[0]
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
