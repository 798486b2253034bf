"""The policy update of one RL step: passes over the rollout batch, mini-batches with one
optimizer step each, micro-batches whose gradients accumulate into that step.

`loop.py` calls `update_policy` after `steps.collect_rollout`; the math it uses lives in
`algo/` (the loss registry, aggregation, KL, rollout correction) and `models/routing.py`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from gspo_cli.algo.aggregation import aggregate
from gspo_cli.algo.kl import kl_estimate
from gspo_cli.algo.losses import LOSSES
from gspo_cli.algo.rollout_correction import importance_weights, logp_mismatch
from gspo_cli.models.routing import Routes, route_rows, routes_by_sequence, routing_metrics, volatility_metrics
from gspo_cli.rollout.generate import Rollout
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.distributed import all_reduce_sum, gradient_sync
from gspo_cli.train.steps import Batch, OldPolicy, StepContext, complete_old_policy, micro_batches, rollout_correction


def minibatch_loss(logp: torch.Tensor, old_logp: torch.Tensor, batch: Batch, indices: torch.Tensor,
                   ctx: StepContext, counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured policy loss on some rows of a mini-batch (plus the KL penalty with a reference).

    Args:
        logp, old_logp: [n, T] log π_θ (with gradient) and log π_old of the rows `indices`.
        counts: response tokens and sequences of the whole mini-batch across all ranks. The
            loss is normalised by them, so the losses of a mini-batch's micro-batches add up
            to the loss of the mini-batch, and the gradient averaged by DDP/FSDP is that of
            the loss on the whole global mini-batch.
    """
    algo, mask = ctx.cfg.algo, batch.loss_tokens(indices)
    agg = dict(loss_agg=algo.loss_agg, horizon=ctx.cfg.trainer.max_new_tokens,  # Dr. GRPO's constant
               num_tokens=counts[0].item(), num_seqs=counts[1].item(), num_shards=ctx.env.world_size)
    mode, cap = rollout_correction(ctx.cfg)
    is_weights, correction = importance_weights(old_logp, batch.rollout.logp[indices], mask, mode, cap)
    loss, metrics = LOSSES[algo.loss](
        logp, old_logp, batch.advantages[indices], mask,
        clip_low=algo.clip_low, clip_high=algo.clip_high, is_weights=is_weights, **agg, **algo.params)
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


def minibatch_logprobs(policy, rollout: Rollout, indices: torch.Tensor, ctx: StepContext,
                       old: Optional[OldPolicy]) -> tuple[torch.Tensor, Optional[Routes]]:
    """log π_θ [n, T] of some rows' responses and, for MoE models, the experts chosen (per
    layer [n, L, k]); with `algo.routing_replay` and a known π_old, its experts are forced."""
    tc, T = ctx.cfg.trainer, rollout.response_mask.shape[1]
    forward = lambda: response_logprobs(policy, rollout.input_ids[indices], rollout.attention_mask[indices],  # noqa: E731
                                        T, tc.temperature, tc.logprob_chunk_tokens)
    if ctx.routing is None:
        return forward(), None
    replay = ctx.routing.replay(route_rows(old.routes, indices)) \
        if ctx.cfg.algo.routing_replay and old is not None and old.routes is not None else contextlib.nullcontext()
    with ctx.routing.capture() as routes, replay:
        logp = forward()
    return logp, routes_by_sequence(list(routes), len(indices))


def minibatch_routing_metrics(rollout: Rollout, indices: torch.Tensor, routes: Optional[Routes],
                              old_routes: Optional[Routes]) -> dict[str, float]:
    """How many of π_old's experts (per layer [n, L, k]) the current policy changed on the rows' tokens."""
    if routes is None or old_routes is None:
        return {}
    # The tokens whose outputs give the response's log-probabilities: from the last prompt token
    # to the one before the last response token (which the sampler never feeds back).
    T = rollout.response_mask.shape[1]
    predicting = torch.zeros(rollout.attention_mask[indices].shape, device=rollout.response_mask.device)  # [n, L]
    predicting[:, -T - 1:-1] = rollout.response_mask[indices]
    return routing_metrics(routes, old_routes, predicting)


def measures_volatility(ctx: StepContext) -> bool:
    """Whether `routing/volatility` is measured: `algo.routing_volatility`, by default on for MoE models."""
    setting = ctx.cfg.algo.routing_volatility
    return ctx.routing is not None and (setting is None or setting)


@torch.no_grad()
def routing_volatility(policy, rollout: Rollout, rows: torch.Tensor, before: list[Routes], ctx: StepContext) -> float:
    """Share of the experts chosen for `rows`' tokens before an optimizer step that the policy
    after it no longer chooses (GSPO paper §4.3: consecutive policies, same tokens).

    Args:
        rows: the first sequences of the mini-batch (its probe).
        before: the routes its micro-batches' forward passes captured before the step, per
            micro-batch per layer [n_j, L, k], in row order.
    """
    n, tc = len(rows), ctx.cfg.trainer
    old = [torch.cat(layer)[:n] for layer in zip(*before)]
    with ctx.routing.capture() as routes:
        response_logprobs(policy, rollout.input_ids[rows], rollout.attention_mask[rows],
                          rollout.response_mask.shape[1], tc.temperature, tc.logprob_chunk_tokens)
    new = routes_by_sequence(list(routes), n)
    return minibatch_routing_metrics(rollout, rows, new, old)["routing/changed_fraction"]


def update_policy(policy, optimizer, scheduler, batch: Batch, ctx: StepContext) -> dict[str, float]:
    """`trainer.ppo_epochs` passes over the batch, each split into `trainer.num_minibatches`
    mini-batches with one optimizer step each; a mini-batch runs in micro-batches of
    `trainer.micro_batch_size` sequences whose gradients accumulate (the loss and gradient
    equal one pass over the mini-batch). The metrics average the applied steps; within a step,
    its micro-batches' metrics are weighted by their response tokens.

    π_old is one value, read by every update. When the trainer recomputes it
    (`algo.old_logp=recompute`), `collect_rollout` leaves out the first mini-batch: that
    mini-batch's own forward passes run before any optimizer step, so they *are* π_old, and
    `complete_old_policy` adds them (one forward pass fewer). The first mini-batch also
    compares the trainer's π_old with the sampler's numbers (`mismatch/*`).

    A mini-batch whose loss or gradient is not finite is skipped (no optimizer step) and
    counted in `faults/skipped_steps`; the other metrics average the applied mini-batches
    (NaN loss and grad_norm if none was).
    """
    tc, rollout, num_seqs = ctx.cfg.trainer, batch.rollout, batch.rewards.numel()
    old: Optional[OldPolicy] = batch.old if batch.old.rows.numel() == num_seqs else None
    sums: dict[str, float] = {}
    skipped, mismatch = 0, {}
    volatility, probe = [], ctx.cfg.algo.routing_volatility_rows if measures_volatility(ctx) else -1
    for epoch in range(tc.ppo_epochs):
        order = batch.order if epoch == 0 else torch.randperm(num_seqs, generator=ctx.generator)
        for indices in order.chunk(tc.num_minibatches):
            mask = batch.loss_tokens(indices)
            counts = all_reduce_sum(torch.tensor([mask.sum().item(), float(mask.shape[0])]), ctx.env)
            optimizer.zero_grad(set_to_none=True)
            parts, step_metrics, before = [], {}, []
            micros = micro_batches(indices, tc.micro_batch_size)
            for j, rows in enumerate(micros):
                logp, routes = minibatch_logprobs(policy, rollout, rows, ctx, old)
                if probe >= 0 and sum(len(r[0]) for r in before) < (probe or len(indices)):
                    before.append(routes)  # this pass's experts, to compare after the step
                # Before the first optimizer step this pass is π_old of its rows (when not known yet).
                this_pass = OldPolicy(rows, logp.detach(), routes)
                old_rows = this_pass if old is None else OldPolicy(
                    rows, old.logp[rows], None if old.routes is None else [r[rows] for r in old.routes])
                if not mismatch:
                    parts.append(this_pass)
                loss, metrics = minibatch_loss(logp, old_rows.logp, batch, rows, ctx, counts)
                with gradient_sync(policy, enabled=j == len(micros) - 1):  # all-reduce once per mini-batch
                    loss.backward()
                # Weight by the global token count, scaled by the world size: the mean over ranks
                # (`steps.reduce_over_ranks`) is then the token-weighted mean of the whole mini-batch.
                share = batch.loss_tokens(rows).sum().item() * ctx.env.world_size / max(counts[0].item(), 1.0)
                metrics.update(minibatch_routing_metrics(rollout, rows, routes, old_rows.routes))
                step_metrics["loss"] = step_metrics.get("loss", 0.0) + loss.item()  # normalised by the mini-batch
                for name, value in metrics.items():
                    step_metrics[name] = step_metrics.get(name, 0.0) + share * float(value)
            if old is None:
                old = complete_old_policy([batch.old, *parts], num_seqs)
                mismatch = logp_mismatch(old.logp, rollout.logp, rollout.response_mask)  # every row
            elif not mismatch:  # the trainer's π_old on the first mini-batch against the sampler's
                rows = torch.cat([part.rows for part in parts])
                mismatch = logp_mismatch(torch.cat([part.logp for part in parts]), rollout.logp[rows],
                                         rollout.response_mask[rows])
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
            finite = math.isfinite(step_metrics["loss"]) and bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                if probe >= 0:
                    volatility.append(routing_volatility(policy, rollout, indices[:probe or len(indices)], before, ctx))
            else:  # one NaN must not poison the weights, Adam's moments or the step's averages
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            scheduler.step()
            if not finite:
                continue
            for name, value in {**step_metrics, "grad_norm": grad_norm}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
    applied = tc.num_minibatches * tc.ppo_epochs - skipped
    means = {name: total / applied for name, total in sums.items()} if applied else {
        "loss": float("nan"), "grad_norm": float("nan")}
    return {**means, **volatility_metrics(volatility), "faults/skipped_steps": float(skipped),
            **{k: v.item() for k, v in mismatch.items()}}
