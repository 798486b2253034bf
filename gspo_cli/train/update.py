"""The policy update of one RL step: passes over the rollout batch, mini-batches with one
optimizer step each, micro-batches whose gradients accumulate into that step.

`loop.py` calls `update_policy` after `steps.collect_rollout`. Read top to bottom:
`update_policy` (epochs, mini-batches, the optimizer step) → `accumulate_gradients` (one
mini-batch's micro-batches, forward and backward) → `minibatch_loss` (the configured loss).
The math lives in `algo/` (the loss registry, aggregation, KL, rollout correction) and
`models/routing.py`; the passes themselves in `passes.py`.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch

from gspo_cli.algo.aggregation import aggregate
from gspo_cli.algo.kl import kl_estimate
from gspo_cli.algo.losses import LOSSES
from gspo_cli.algo.rollout_correction import importance_weights, logp_mismatch
from gspo_cli.models.routing import Routes, routing_metrics, volatility_metrics
from gspo_cli.rollout.generate import Rollout
from gspo_cli.train.distributed import all_reduce_sum, micro_batch_sync, unwrap
from gspo_cli.train.passes import plan_micro_batches, replaying, score_rows
from gspo_cli.train.steps import (Batch, OldPolicy, StepContext, complete_old_policy, gather_rows, keeps_old_routes,
                                  measures_volatility, old_logprobs, rollout_correction, rows_logprobs)


def minibatch_loss(logp: torch.Tensor, old_logp: torch.Tensor, batch: Batch, indices: torch.Tensor,
                   ctx: StepContext, counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured policy loss on some rows of a mini-batch (plus the KL penalty with a reference).

    Args:
        logp, old_logp: [n, T] log π_θ (with gradient) and log π_old of the rows `indices`.
        counts: response tokens and sequences of the whole mini-batch across all ranks
            (`loss_counts`). The loss is normalised by them, so the losses of a mini-batch's
            micro-batches add up to the loss of the mini-batch, and the gradient averaged by
            DDP/FSDP is that of the loss on the whole global mini-batch.
    """
    algo, mask = ctx.cfg.algo, batch.loss_tokens(indices)
    agg = dict(loss_agg=algo.loss_agg, horizon=ctx.cfg.trainer.max_new_tokens,  # Dr. GRPO's constant
               num_tokens=counts[0].item(), num_seqs=counts[1].item(), num_shards=ctx.env.world_size)
    mode, cap = rollout_correction(ctx.cfg)
    is_weights, correction = importance_weights(old_logp, batch.rollout.logp[indices], mask, mode, cap,
                                                cap_low=algo.rollout_correction_cap_low)
    loss, metrics = LOSSES[algo.loss](
        logp, old_logp, batch.advantages[indices], mask,
        clip_low=algo.clip_low, clip_high=algo.clip_high, is_weights=is_weights,
        sampler_logp=batch.rollout.logp[indices],  # the sampler's numbers: icepop, off-policy masking
        **agg, **algo.params)
    metrics.update(correction)
    if batch.ref_logp is not None:
        # Padding and masked-out rows hold whatever the passes left there (-inf from an engine,
        # a cut-off response's tokens): neutral values keep inf/NaN out of the loss and its gradient.
        real = mask.bool()
        kl_tokens = kl_estimate(torch.where(real, logp, 0.0), torch.where(real, batch.ref_logp[indices], 0.0),
                                algo.kl_estimator)
        kl = aggregate(kl_tokens, mask, algo.loss_agg,
                       **{k: v for k, v in agg.items() if k != "loss_agg"})
        loss = loss + algo.kl_coef * kl
        metrics["kl/ref"] = kl.detach()
    return loss, metrics


def loss_counts(batch: Batch, indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """[2] the loss tokens of the mini-batch `indices` and its sequences that have any, summed over
    ranks. A response `algo.mask_truncated` leaves out entirely is not a sequence of the mean."""
    mask = batch.loss_tokens(indices)
    return all_reduce_sum(torch.tensor([mask.sum().item(), float((mask.sum(1) > 0).sum().item())],
                                       dtype=torch.float64), ctx.env)


def minibatch_routing_metrics(rollout: Rollout, indices: torch.Tensor, routes: Optional[Routes],
                              old_routes: Optional[Routes]) -> dict[str, float]:
    """How many of π_old's experts (per layer [n, P + T, k]) the current policy changed on the rows' tokens."""
    if routes is None or old_routes is None:
        return {}
    # The tokens whose outputs give the response's log-probabilities: from the last prompt token
    # to the one before the last response token (which the sampler never feeds back).
    T = rollout.response_mask.shape[1]
    predicting = torch.zeros(rollout.attention_mask[indices].shape, device=rollout.response_mask.device)  # [n, P+T]
    predicting[:, -T - 1:-1] = rollout.response_mask[indices]
    return routing_metrics(routes, old_routes, predicting)


class Accumulated(NamedTuple):
    """What one mini-batch's forward and backward passes leave besides its gradients."""

    metrics: dict[str, float]  # the mini-batch's loss, and its other metrics weighted by tokens
    own: list[OldPolicy]  # the policy's own log π (and experts) of every row, before the step


def accumulate_gradients(policy, batch: Batch, indices: torch.Tensor, ctx: StepContext, old: Optional[OldPolicy],
                         counts: torch.Tensor) -> Accumulated:
    """Forward and backward passes over the mini-batch `indices`, one micro-batch at a time; their
    gradients add up to the gradient of one pass over the mini-batch (and across ranks).

    Args:
        old: π_old of every row; None while the trainer recomputes it (`update_policy`): then
            each pass divides by its own values (ratio 1, before any step).
        counts: `loss_counts` of the mini-batch.
    """
    tc, rollout, algo = ctx.cfg.trainer, batch.rollout, ctx.cfg.algo
    micros = plan_micro_batches(rollout, indices, tc.micro_batch_size, tc.micro_batch_tokens, ctx.env)
    capture = ctx.routing if (keeps_old_routes(ctx) or measures_volatility(ctx)) else None
    metrics: dict[str, float] = {}
    own = []
    for j, micro in enumerate(micros):
        old_rows = None if old is None else gather_rows([old], micro.rows)
        # Routing Replay stays on through the backward: gradient checkpointing re-runs the routers there.
        replay = replaying(ctx.routing, old_rows.routes, micro) if algo.routing_replay and old_rows else \
            contextlib.nullcontext()
        with micro_batch_sync(policy, j == len(micros) - 1, ctx.cfg.hardware.fsdp_unsharded_accumulation), replay:
            logp, routes = score_rows(policy, rollout, micro, tc.temperature, tc.logprob_chunk_tokens, capture)
            own.append(OldPolicy(micro.rows, logp.detach(), routes))
            old_rows = old_rows or own[-1]
            loss, micro_metrics = minibatch_loss(logp, old_rows.logp, batch, micro.rows, ctx, counts)
            loss.backward()
        micro_metrics.update(minibatch_routing_metrics(rollout, micro.rows, routes, old_rows.routes))
        # Weight by the global token count, scaled by the world size: the mean over ranks
        # (`steps.reduce_over_ranks`) is then the token-weighted mean of the whole mini-batch.
        share = batch.loss_tokens(micro.rows).sum().item() * ctx.env.world_size / max(counts[0].item(), 1.0)
        metrics["loss"] = metrics.get("loss", 0.0) + loss.item()  # each part normalised by the mini-batch
        for name, value in micro_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + share * float(value)
    return Accumulated(metrics, own)


def probe_rows(indices: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """The first rows of a mini-batch that the volatility probe re-runs: this rank's share of
    `algo.routing_volatility_rows` (a number across all ranks; 0: every row)."""
    total = ctx.cfg.algo.routing_volatility_rows
    return indices if total <= 0 else indices[:-(-total // ctx.env.world_size)]


@torch.no_grad()
def routing_volatility(policy, rollout: Rollout, rows: torch.Tensor, before: list[OldPolicy],
                       ctx: StepContext) -> float:
    """Share of the experts chosen for `rows`' tokens before an optimizer step that the policy
    after it no longer chooses: consecutive policies, same tokens (`routing/volatility`, this
    project's measure of the GSPO paper's expert volatility, §5.3; docs/metrics.md sets it
    against the paper's sentence and against `routing/changed_fraction`).

    Args:
        rows: the probe's rows of the mini-batch.
        before: the mini-batch's passes before the step, with the experts they chose.
    """
    after = rows_logprobs(policy, rollout, rows, ctx, ctx.routing)
    return minibatch_routing_metrics(rollout, rows, after.routes,
                                     gather_rows(before, rows).routes)["routing/changed_fraction"]


def update_policy(policy, optimizer, scheduler, batch: Batch, ctx: StepContext) -> dict[str, float]:
    """`trainer.ppo_epochs` passes over the batch, each split into `trainer.num_minibatches`
    mini-batches with one optimizer step each; a mini-batch runs in micro-batches
    (`trainer.micro_batch_size`, `trainer.micro_batch_tokens`) whose gradients accumulate (the
    loss and gradient equal one pass over the mini-batch). The metrics average the applied
    steps; within a step, its micro-batches' metrics are weighted by their response tokens.

    π_old is one value, read by every update. When the trainer recomputes it
    (`algo.old_logp=recompute`), `collect_rollout` leaves out the first mini-batch: that
    mini-batch's own forward passes run before any optimizer step, so they *are* π_old, and
    complete it (one forward pass fewer). The trainer's π_old is compared with the sampler's
    numbers (`mismatch/*`): on every row when recomputed, else on the first mini-batch.

    A mini-batch whose loss or gradient is not finite is skipped (no optimizer step) and
    counted in `faults/skipped_steps`; one without a single loss token (every response cut off
    under `algo.mask_truncated`) is skipped too and counted in `update/empty_minibatches`. The
    other metrics average the applied mini-batches (NaN loss and grad_norm if none was). The
    gradients are freed at the end, before the next rollout needs the memory.
    """
    tc, rollout, num_seqs = ctx.cfg.trainer, batch.rollout, batch.rewards.numel()
    old: Optional[OldPolicy] = batch.old if batch.old.rows.numel() == num_seqs else None
    sums: dict[str, float] = {}
    mismatch: dict[str, torch.Tensor] = {}
    volatility: list[float] = []
    skipped = empty = 0
    for epoch in range(tc.ppo_epochs):
        order = batch.order if epoch == 0 else torch.randperm(num_seqs, generator=ctx.generator)
        for k, indices in enumerate(order.chunk(tc.num_minibatches)):
            optimizer.zero_grad(set_to_none=True)
            counts = loss_counts(batch, indices, ctx)
            if counts[0] == 0:  # the same on every rank: the counts are global
                if old is None:  # its rows enter no loss, but π_old must cover every row
                    old = complete_old_policy([batch.old, old_logprobs(unwrap(policy), rollout, ctx, [indices])],
                                              num_seqs)
                    mismatch = logp_mismatch(old.logp, rollout.logp, rollout.response_mask)
                scheduler.step()
                empty += 1
                continue
            accumulated = accumulate_gradients(policy, batch, indices, ctx, old, counts)
            if old is None:  # these passes ran before any optimizer step: they complete π_old
                old = complete_old_policy([batch.old, *accumulated.own], num_seqs)
                mismatch = logp_mismatch(old.logp, rollout.logp, rollout.response_mask)  # every row
            elif epoch == 0 and k == 0:  # π_old is the sampler's: the trainer's first passes against it
                first = gather_rows(accumulated.own, indices)
                mismatch = logp_mismatch(first.logp, rollout.logp[indices], rollout.response_mask[indices])

            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
            finite = math.isfinite(accumulated.metrics["loss"]) and bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                if measures_volatility(ctx):
                    volatility.append(routing_volatility(policy, rollout, probe_rows(indices, ctx),
                                                         accumulated.own, ctx))
                for name, value in {**accumulated.metrics, "grad_norm": grad_norm}.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
            else:  # one NaN must not poison the weights, Adam's moments or the step's averages
                skipped += 1
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    applied = tc.num_minibatches * tc.ppo_epochs - skipped - empty
    means = {name: total / applied for name, total in sums.items()} if applied else {
        "loss": float("nan"), "grad_norm": float("nan")}
    # The clip share among tokens that have a gradient to clip (A ≠ 0): comparable between runs
    # whose shares of all-equal groups differ. From the sums over all ranks, so every rank logs
    # the same keys (a rank whose groups all agreed has no such token of its own: reduce_over_ranks
    # then gets one metric fewer from it, a collective of another size) and the share is the batch's.
    shares = torch.tensor([means.pop("clip/nonzero_adv_share", 0.0), means.get("adv/nonzero_fraction", 0.0)],
                          dtype=torch.float64)
    clipped_signal, signal = all_reduce_sum(shares, ctx.env).tolist()
    if signal > 0:  # on every rank alike; left out of a step whose batch has no such token
        means["clip/fraction_nonzero_adv"] = clipped_signal / signal
    return {**means, **volatility_metrics(volatility), "faults/skipped_steps": float(skipped),
            **({"update/empty_minibatches": float(empty)} if ctx.cfg.algo.mask_truncated else {}),
            **{k: v.item() for k, v in mismatch.items()}}
