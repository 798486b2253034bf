"""The named steps of one RL step: collect a scored rollout batch, then update the policy on it.

`loop.py` calls these in order; the math they use lives in `algo/` (losses, aggregation,
advantages, KL, rollout correction) and `models/routing.py`. With several processes every rank holds a shard of the
prompts (a prompt's G responses never split), and every normalisation uses global counts.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch

from gspo_cli.algo.advantages import compute_advantages
from gspo_cli.algo.aggregation import aggregate
from gspo_cli.algo.batch_shaping import overlong_penalty
from gspo_cli.algo.kl import kl_estimate
from gspo_cli.algo.losses import LOSSES, masked_mean
from gspo_cli.algo.rollout_correction import logp_mismatch, truncated_is_weights
from gspo_cli.config import TrainConfig
from gspo_cli.data.tasks import PromptStream, Task
from gspo_cli.models.routing import (
    MoERouting,
    Routes,
    route_rows,
    routes_by_sequence,
    routes_megabytes,
    routing_metrics,
)
from gspo_cli.rollout.generate import Rollout, generate_rollout
from gspo_cli.rollout.refill import fill_with_informative_groups
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.distributed import DistEnv, all_reduce_any, all_reduce_sum, shard, unwrap


@dataclass
class StepContext:
    """What the steps need besides the policy and the batch."""

    cfg: TrainConfig
    task: Task
    tokenizer: Any
    env: DistEnv
    generator: torch.Generator  # CPU: mini-batch order (and sampling, on CPU)
    routing: Optional[MoERouting] = None  # hooks on the MoE routers (None for dense models)
    ref_model: Optional[torch.nn.Module] = None  # frozen reference, only when algo.kl_coef != 0
    sampling_generator: Optional[torch.Generator] = None  # on the GPU when sampling there; None: `generator`

    def still_running(self, any_alive: bool) -> bool:
        """Keep sampling while any sequence on any rank is unfinished (FSDP needs lockstep)."""
        return all_reduce_any(any_alive, self.env)


class OldPolicy(NamedTuple):
    """π_old on some rows of the rollout batch: what every update's ratios divide by (n rows)."""

    rows: torch.Tensor  # [n] the rows of the batch these values belong to
    logp: torch.Tensor  # [n, T] log π_old of the sampled tokens
    routes: Optional[Routes] = None  # per MoE layer [n, L, k] experts π_old chose


class Batch(NamedTuple):
    """A scored rollout batch ready for the policy update (N = this rank's prompts × G)."""

    rollout: Rollout
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N, T] entropy of π_old at each response position
    order: torch.Tensor  # [N] rows in the first epoch's mini-batch order
    old: OldPolicy  # π_old of every row, or of every row but the first mini-batch's (see update_policy)
    ref_logp: Optional[torch.Tensor] = None  # [N, T] log π_ref, only when algo.kl_coef != 0


def old_logp_source(cfg: TrainConfig) -> str:
    """Where π_old comes from: "recompute" (a forward pass after sampling) or "rollout".

    `algo.old_logp=auto` takes the sampler's own log-probabilities when they are the
    trainer's numbers: the sampler is this very model, in float32, so a recomputation
    would return them again (to ~1e-7 on CPU, `mismatch/logp_abs_diff` logs the gap) at
    the cost of a forward pass over the whole batch. Under bf16 the KV-cache path of the
    sampler rounds differently from the trainer's full pass, and `algo.tis_cap` exists to
    correct that gap, so both recompute.
    """
    algo = cfg.algo
    if algo.old_logp != "auto":
        return algo.old_logp
    same_numbers = cfg.hardware.precision == "fp32" and cfg.model.dtype == "float32"
    return "rollout" if same_numbers and algo.tis_cap is None else "recompute"


def sample_and_score(policy, ctx: StepContext, stream: PromptStream,
                     timings: dict[str, float]) -> tuple[Rollout, torch.Tensor]:
    """Sample G responses to this rank's share of the next `prompts_per_step` prompts; score them."""
    tc = ctx.cfg.trainer
    problems = shard(stream.next_batch(tc.prompts_per_step), ctx.env)  # every rank reads the same stream
    prompts = [p.prompt for p in problems for _ in range(tc.group_size)]  # groups contiguous
    answers = [p.answer for p in problems for _ in range(tc.group_size)]

    start = time.perf_counter()
    routing = ctx.routing if old_logp_source(ctx.cfg) == "rollout" else None  # the sampler's routes are π_old's
    rollout = generate_rollout(policy, ctx.tokenizer, prompts, tc.max_new_tokens, tc.temperature,
                               ctx.sampling_generator or ctx.generator, ctx.still_running, routing,
                               top_p=tc.top_p, top_k=tc.top_k, stop_strings=tc.stop_strings)
    timings["time/generate_s"] = timings.get("time/generate_s", 0.0) + time.perf_counter() - start

    start = time.perf_counter()
    num_tokens = rollout.response_mask.sum(1).long().tolist()  # lengths for the overlong penalty
    scores, reward_metrics = ctx.task.score(rollout.completions, answers, num_tokens, tc.max_new_tokens)
    rewards = torch.tensor(scores, device=rollout.response_mask.device)
    if "time/reward_s" not in timings:  # with dynamic sampling: the first, unfiltered draw
        timings.update(reward_metrics)  # reward/<name>/mean per component, reward/errors
    timings["time/reward_s"] = timings.get("time/reward_s", 0.0) + time.perf_counter() - start
    return rollout, rewards


def old_logprobs(sampler, rollout: Rollout, ctx: StepContext, minibatches: Sequence[torch.Tensor]) -> OldPolicy:
    """π_old of the rows of `minibatches`, one mini-batch at a time: peak memory is one
    mini-batch's logits, and rows do not interact in the forward pass, so the values are
    those of one pass over the batch."""
    T = rollout.response_mask.shape[1]
    logps, routes = [], []
    for rows in minibatches:
        capture = ctx.routing.capture() if ctx.routing else contextlib.nullcontext()
        with torch.no_grad(), capture as recorded:
            logps.append(response_logprobs(sampler, rollout.input_ids[rows], rollout.attention_mask[rows], T,
                                           ctx.cfg.trainer.temperature))
        if recorded is not None:
            routes.append(routes_by_sequence(list(recorded), len(rows)))  # per layer [n, L, k]
    return OldPolicy(torch.cat(list(minibatches)), torch.cat(logps),
                     [torch.cat(layer) for layer in zip(*routes)] if routes else None)


def complete_old_policy(known: OldPolicy, first: OldPolicy, num_seqs: int) -> OldPolicy:
    """π_old of every row, in row order, from two parts that together cover each row once."""
    rows = torch.cat([known.rows, first.rows])
    if rows.numel() != num_seqs or torch.unique(rows).numel() != num_seqs:
        raise ValueError(f"π_old parts cover {torch.unique(rows).numel()} distinct of {rows.numel()} rows, "
                         f"not each of the batch's {num_seqs} rows once")
    position = torch.empty_like(rows)
    position[rows] = torch.arange(num_seqs, device=rows.device)  # where each row's values are in the parts
    routes = None if known.routes is None or first.routes is None else [
        torch.cat(layer)[position] for layer in zip(known.routes, first.routes)]
    return OldPolicy(torch.arange(num_seqs, device=rows.device), torch.cat([known.logp, first.logp])[position],
                     routes)


def reference_logprobs(ref_model, rollout: Rollout, minibatches: Sequence[torch.Tensor],
                       temperature: float) -> torch.Tensor:
    """log π_ref [N, T] of every row, one mini-batch at a time (peak memory: one mini-batch's
    [n, T, V] logits, as for π_old; a whole batch of a 150k-token vocabulary would not fit)."""
    T = rollout.response_mask.shape[1]
    ref_logp = torch.empty(rollout.input_ids.shape[0], T, device=rollout.input_ids.device)
    with torch.no_grad():
        for rows in minibatches:
            ref_logp[rows] = response_logprobs(ref_model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                                  T, temperature)
    return ref_logp


def collect_rollout(policy, ctx: StepContext, stream: PromptStream) -> tuple[Batch, dict[str, float]]:
    """Sample and score a batch (refilled by dynamic sampling if set), then compute the
    advantages, π_old (with the experts it chose), the sampler/trainer gap and log π_ref."""
    tc, algo = ctx.cfg.trainer, ctx.cfg.algo
    timings: dict[str, float] = {}
    sampler = unwrap(policy)  # DDP's forward hooks are for training passes only
    sampler.eval()
    draw = lambda: sample_and_score(sampler, ctx, stream, timings)  # noqa: E731
    if algo.dynamic_sampling:
        filled = fill_with_informative_groups(draw, tc.prompts_per_step // ctx.env.world_size, tc.group_size,
                                              algo.max_refill_rounds, ctx.tokenizer.pad_token_id)
        rollout, rewards = filled.rollout, filled.rewards
        timings.update(filled.metrics)
        if filled.warning:
            warnings.warn(filled.warning, stacklevel=2)
    else:
        rollout, rewards = draw()
    mask = rollout.response_mask

    shaped = rewards
    if algo.overlong_buffer > 0:
        penalty = overlong_penalty(mask.sum(1), tc.max_new_tokens, algo.overlong_buffer * tc.max_new_tokens,
                                   algo.overlong_penalty)
        shaped = rewards + penalty
        timings["reward/overlong_penalty"] = penalty.mean().item()
    advantages = compute_advantages(shaped, tc.group_size, algo.adv_baseline, algo.adv_scale)

    start = time.perf_counter()
    order = torch.randperm(mask.shape[0], generator=ctx.generator)  # the first epoch's mini-batches
    if old_logp_source(ctx.cfg) == "recompute":  # all but the first mini-batch: see update_policy
        old = old_logprobs(sampler, rollout, ctx, order.chunk(tc.num_minibatches)[1:])
    else:  # the sampler's numbers; the gap is measured on the first mini-batch (update_policy)
        old = OldPolicy(torch.arange(mask.shape[0], device=mask.device), rollout.logp, rollout.routes)
    if old.routes is not None:
        timings["routing/replay_cache_mb"] = routes_megabytes(old.routes)
    timings["time/old_logp_s"] = time.perf_counter() - start

    ref_logp = None
    if ctx.ref_model is not None:
        ref_logp = reference_logprobs(ctx.ref_model, rollout, order.chunk(tc.num_minibatches), tc.temperature)
    sampler.train()
    # π_old's entropy is the sampler's: the same distribution, and no further pass is needed for it.
    return Batch(rollout, rewards, advantages, rollout.entropy, order, old, ref_logp), timings


def minibatch_loss(logp: torch.Tensor, old: OldPolicy, batch: Batch, indices: torch.Tensor, ctx: StepContext
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured policy loss on one mini-batch (plus the KL penalty with a reference).

    `old` holds π_old of every row in row order. Token and sequence counts are those of the
    mini-batch across all ranks, so the gradient averaged by DDP/FSDP equals the gradient of
    the loss on the whole global mini-batch.
    """
    algo, mask, old_logp = ctx.cfg.algo, batch.rollout.response_mask[indices], old.logp[indices]
    counts = all_reduce_sum(torch.tensor([mask.sum().item(), float(mask.shape[0])]), ctx.env)
    agg = dict(loss_agg=algo.loss_agg, horizon=ctx.cfg.trainer.max_new_tokens,  # Dr. GRPO's constant
               num_tokens=counts[0].item(), num_seqs=counts[1].item(), num_shards=ctx.env.world_size)
    is_weights = None if algo.tis_cap is None else \
        truncated_is_weights(old_logp, batch.rollout.logp[indices], algo.tis_cap)
    loss, metrics = LOSSES[algo.loss](
        logp, old_logp, batch.advantages[indices], mask,
        clip_low=algo.clip_low, clip_high=algo.clip_high, is_weights=is_weights, **agg, **algo.params)
    if batch.ref_logp is not None:
        kl = aggregate(kl_estimate(logp, batch.ref_logp[indices], algo.kl_estimator), mask, algo.loss_agg,
                       **{k: v for k, v in agg.items() if k != "loss_agg"})
        loss = loss + algo.kl_coef * kl
        metrics["kl/ref"] = kl.detach()
    return loss, metrics


def minibatch_logprobs(policy, rollout: Rollout, indices: torch.Tensor, ctx: StepContext,
                       old: Optional[OldPolicy]) -> tuple[torch.Tensor, Optional[Routes]]:
    """log π_θ [n, T] of a mini-batch's responses and, for MoE models, the experts chosen
    (per layer [n, L, k]); with `algo.routing_replay` and a known π_old, its experts are forced."""
    T = rollout.response_mask.shape[1]
    forward = lambda: response_logprobs(policy, rollout.input_ids[indices],  # noqa: E731
                                        rollout.attention_mask[indices], T, ctx.cfg.trainer.temperature)
    if ctx.routing is None:
        return forward(), None
    replay = ctx.routing.replay(route_rows(old.routes, indices)) \
        if ctx.cfg.algo.routing_replay and old is not None and old.routes is not None else contextlib.nullcontext()
    with ctx.routing.capture() as routes, replay:
        logp = forward()
    return logp, routes_by_sequence(list(routes), len(indices))


def minibatch_routing_metrics(rollout: Rollout, indices: torch.Tensor, routes: Optional[Routes],
                              old: OldPolicy) -> dict[str, float]:
    """How many of π_old's experts the current policy changed on the mini-batch's tokens."""
    if routes is None or old.routes is None:
        return {}
    # The tokens whose outputs give the response's log-probabilities: from the last prompt token
    # to the one before the last response token (which the sampler never feeds back).
    T = rollout.response_mask.shape[1]
    predicting = torch.zeros(rollout.attention_mask[indices].shape, device=rollout.response_mask.device)  # [n, L]
    predicting[:, -T - 1:-1] = rollout.response_mask[indices]
    return routing_metrics(routes, [layer[indices] for layer in old.routes], predicting)


def update_policy(policy, optimizer, scheduler, batch: Batch, ctx: StepContext) -> dict[str, float]:
    """`trainer.ppo_epochs` passes over the batch, each split into `trainer.num_minibatches`
    mini-batches with one optimizer step each; the metrics average the applied steps.

    π_old is one value, read by every update. When the trainer recomputes it
    (`algo.old_logp=recompute`), `collect_rollout` leaves out the first mini-batch: that
    mini-batch's own forward pass runs before any optimizer step, so it *is* π_old, and
    `complete_old_policy` adds it (one forward pass fewer). The first update also compares
    the trainer's π_old with the sampler's numbers (`mismatch/*`).

    A mini-batch whose loss or gradient is not finite is skipped (no optimizer step) and
    counted in `faults/skipped_steps`; the other metrics average the applied mini-batches
    (NaN loss and grad_norm if none was).
    """
    tc, rollout, num_seqs = ctx.cfg.trainer, batch.rollout, batch.rewards.numel()
    old: Optional[OldPolicy] = batch.old if batch.old.rows.numel() == num_seqs else None
    sums: dict[str, float] = {}
    skipped, mismatch = 0, {}
    for epoch in range(tc.ppo_epochs):
        order = batch.order if epoch == 0 else torch.randperm(num_seqs, generator=ctx.generator)
        for indices in order.chunk(tc.num_minibatches):
            logp, routes = minibatch_logprobs(policy, rollout, indices, ctx, old)
            if old is None:  # no optimizer step yet: this pass is π_old of its rows
                old = complete_old_policy(batch.old, OldPolicy(indices, logp.detach(), routes), num_seqs)
                mismatch = logp_mismatch(old.logp, rollout.logp, rollout.response_mask)  # every row
            elif not mismatch:  # the trainer's π_old on this mini-batch against the sampler's
                mismatch = logp_mismatch(logp.detach(), rollout.logp[indices], rollout.response_mask[indices])
            loss, metrics = minibatch_loss(logp, old, batch, indices, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
            finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
            else:  # one NaN must not poison the weights, Adam's moments or the step's averages
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            scheduler.step()
            if not finite:
                continue
            routing = minibatch_routing_metrics(rollout, indices, routes, old)
            for name, value in {"loss": loss.detach(), "grad_norm": grad_norm, **metrics, **routing}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
    applied = tc.num_minibatches * tc.ppo_epochs - skipped
    means = {name: total / applied for name, total in sums.items()} if applied else {
        "loss": float("nan"), "grad_norm": float("nan")}
    return {**means, "faults/skipped_steps": float(skipped), **{k: v.item() for k, v in mismatch.items()}}


def rollout_metrics(batch: Batch) -> dict[str, float]:
    """Reward, length and entropy statistics of a rollout batch."""
    mask, truncated = batch.rollout.response_mask, batch.rollout.truncated
    return {
        "reward/mean": batch.rewards.mean().item(),
        "reward/std": batch.rewards.std().item(),
        "response_length/mean": mask.sum(1).mean().item(),
        "entropy": masked_mean(batch.entropy, mask).item(),
        **({} if truncated is None else {"response/truncated_fraction": truncated.float().mean().item()}),
    }


def mean_over_ranks(metrics: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average every metric over ranks (shards are equal in size), so rank 0 logs global values."""
    if not env.distributed:
        return metrics
    names = sorted(metrics)
    values = all_reduce_sum(torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64), env)
    return {n: v / env.world_size for n, v in zip(names, values.tolist())}
