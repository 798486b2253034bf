"""The named steps of one RL step: collect a scored rollout batch, then update the policy on it.

`loop.py` calls these in order; the math they use lives in `algo/` (losses, aggregation,
advantages, KL, rollout correction) and `models/routing.py`. With several processes every rank holds a shard of the
prompts (a prompt's G responses never split), and every normalisation uses global counts.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch

from gspo_cli.algo.advantages import compute_advantages
from gspo_cli.algo.batch_shaping import informative_groups, overlong_penalty
from gspo_cli.algo.losses import masked_mean
from gspo_cli.config import TrainConfig
from gspo_cli.data.tasks import PromptStream, Task
from gspo_cli.models.routing import MoERouting, Routes, load_balance_metrics, routes_megabytes
from gspo_cli.rollout.batching import concat_rollouts
from gspo_cli.rollout.evaluation import greedy_eval
from gspo_cli.rollout.engines import sample_rollout
from gspo_cli.rollout.generate import Rollout
from gspo_cli.rollout.refill import fill_with_informative_groups
from gspo_cli.train.distributed import (DistEnv, all_gather_rows, all_reduce_any, all_reduce_max, all_reduce_sum,
                                        gathered_for_generation, shard, unwrap)
from gspo_cli.train.passes import plan_micro_batches, score_rows


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
    loss_mask: Optional[torch.Tensor] = None  # [N, T] tokens the loss counts; None: every response token

    def loss_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, T] the tokens of `rows` that enter the loss (`algo.mask_truncated` leaves cut-off responses out)."""
        return (self.rollout.response_mask if self.loss_mask is None else self.loss_mask)[rows]


def old_logp_source(cfg: TrainConfig) -> str:
    """Where π_old comes from: "recompute" (a forward pass after sampling) or "rollout".

    `algo.old_logp=auto` takes the sampler's own log-probabilities when they are the
    trainer's numbers: the sampler is this very model, in float32, so a recomputation
    would return them again (to ~1e-7 on CPU, `mismatch/logp_abs_diff` logs the gap) at
    the cost of a forward pass over the whole batch. Under bf16 the KV-cache path of the
    sampler rounds differently from the trainer's full pass, and a rollout correction exists to
    correct that gap, so both recompute.
    """
    algo = cfg.algo
    if algo.old_logp != "auto":
        return algo.old_logp
    same_numbers = cfg.hardware.precision == "fp32" and cfg.model.dtype == "float32"
    full_distribution = cfg.trainer.top_p >= 1.0 and cfg.trainer.top_k == 0  # top-p/k: the sampler's is truncated
    own_sampler = cfg.trainer.rollout_engine == "builtin"  # another engine's numbers come from other kernels
    uncorrected = rollout_correction(cfg)[0] == "none"
    return "rollout" if same_numbers and full_distribution and own_sampler and uncorrected else "recompute"


def rollout_correction(cfg: TrainConfig) -> tuple[str, float]:
    """(mode, cap) of the rollout correction; `algo.tis_cap=C` is `tis-token` with cap C."""
    algo = cfg.algo
    return ("tis-token", algo.tis_cap) if algo.tis_cap is not None else (algo.rollout_correction,
                                                                          algo.rollout_correction_cap)


def sample_and_score(policy, ctx: StepContext, stream: PromptStream,
                     timings: dict[str, float]) -> tuple[Rollout, torch.Tensor]:
    """Sample G responses to this rank's share of the next `prompts_per_step` prompts; score them."""
    tc = ctx.cfg.trainer
    problems = shard(stream.next_batch(tc.prompts_per_step), ctx.env)  # every rank reads the same stream
    prompts = [p.prompt for p in problems for _ in range(tc.group_size)]  # groups contiguous
    answers = [p.answer for p in problems for _ in range(tc.group_size)]

    start = time.perf_counter()
    # the sampler's routes are π_old's, when they are kept (the built-in engine records them)
    records = old_logp_source(ctx.cfg) == "rollout" and keeps_old_routes(ctx) and tc.rollout_engine == "builtin"
    size = tc.rollout_batch_size or len(prompts)  # rows whose KV cache exists at once
    with gathered_for_generation(policy, ctx.cfg.hardware.gather_for_rollout):  # FSDP2: gathered once, not per token
        rollout = concat_rollouts([
            sample_rollout(tc.rollout_engine, policy, ctx.tokenizer, prompts[i:i + size], tc.max_new_tokens,
                           tc.temperature, ctx.sampling_generator or ctx.generator, ctx.still_running,
                           ctx.routing if records else None, top_p=tc.top_p, top_k=tc.top_k,
                           stop_strings=tc.stop_strings, engine_options=tc.rollout_engine_options)
            for i in range(0, len(prompts), size)], ctx.tokenizer.pad_token_id)
    timings["time/generate_s"] = timings.get("time/generate_s", 0.0) + time.perf_counter() - start

    start = time.perf_counter()
    num_tokens = rollout.response_mask.sum(1).long().tolist()  # lengths for the overlong penalty
    scores, reward_metrics = ctx.task.score(rollout.completions, answers, num_tokens, tc.max_new_tokens)
    rewards = torch.tensor(scores, device=rollout.response_mask.device)
    if "time/reward_s" not in timings:  # with dynamic sampling: the first, unfiltered draw
        timings.update(reward_metrics)  # reward/<name>/mean per component, reward/errors
    timings["time/reward_s"] = timings.get("time/reward_s", 0.0) + time.perf_counter() - start
    return rollout, rewards


def evaluate(policy, ctx: StepContext) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy evaluation on the held-out problems, shared across ranks: each rank decodes a
    contiguous share (padded to equal counts with repeats of the last problem, left out of the
    figures, so every rank runs the same passes in lockstep), and the figures are summed over
    ranks: the same numbers as one process. Returns (metrics, this rank's samples)."""
    tc, env, problems = ctx.cfg.trainer, ctx.env, ctx.task.eval
    per_rank = -(-len(problems) // env.world_size)
    mine = problems[env.rank * per_rank:(env.rank + 1) * per_rank]
    real = len(mine)
    _, samples = greedy_eval(unwrap(policy), ctx.tokenizer, ctx.task, mine + problems[-1:] * (per_rank - real),
                             tc.max_new_tokens, tc.eval_batch_size, stop_strings=tc.stop_strings,
                             still_running=ctx.still_running, engine=tc.rollout_engine,
                             engine_options=tc.rollout_engine_options)
    samples = samples[:real]
    sums = all_reduce_sum(torch.tensor([float(len(samples)), sum(s["reward"] >= 1.0 for s in samples),
                                        sum(s["reward"] for s in samples), sum(s["response_length"] for s in samples)],
                                       dtype=torch.float64), env).tolist()
    n = max(sums[0], 1.0)
    return {"eval/accuracy": sums[1] / n, "eval/reward": sums[2] / n, "eval/response_length": sums[3] / n}, samples


def gather_correct(samples: Sequence[dict[str, Any]], ctx: StepContext) -> list[int]:
    """Whether each held-out problem was answered correctly (1, else 0), in the task's order,
    from every rank's `evaluate` samples (a collective: every rank calls it; each holds the list).

    Each rank holds its contiguous share of ⌈P / ranks⌉ problems (the last may hold fewer): the
    shares are padded with -1 to equal lengths, gathered in rank order, and the padding dropped.
    """
    per_rank = -(-len(ctx.task.eval) // ctx.env.world_size)
    mine = [int(s["reward"] >= 1.0) for s in samples] + [-1] * (per_rank - len(samples))
    gathered = all_gather_rows(torch.tensor(mine, dtype=torch.long), ctx.env)  # [ranks · per_rank]
    return [c for c in gathered.tolist() if c >= 0]


def keeps_old_routes(ctx: StepContext) -> bool:
    """Whether π_old's experts are kept: for Routing Replay and for `routing/changed_fraction`
    (`algo.routing_metrics`, by default on for MoE models)."""
    algo = ctx.cfg.algo
    return ctx.routing is not None and (algo.routing_replay or algo.routing_metrics is not False)


def measures_volatility(ctx: StepContext) -> bool:
    """Whether `routing/volatility` is measured: `algo.routing_volatility`, by default on for MoE models."""
    return ctx.routing is not None and ctx.cfg.algo.routing_volatility is not False


def gather_rows(parts: Sequence[OldPolicy], rows: torch.Tensor) -> OldPolicy:
    """The values of `rows` ([n] batch rows, in that order) from parts that hold each of them."""
    parts = [part for part in parts if part.rows.numel()]
    held = torch.cat([part.rows for part in parts])
    size = int(max(held.max(), rows.max())) + 1 if rows.numel() else 0
    position = torch.full((size,), -1, dtype=torch.long, device=held.device)
    position[held] = torch.arange(held.numel(), device=held.device)  # where each row's values are in the parts
    index = position[rows]
    if (index < 0).any():
        raise ValueError(f"rows {rows[index < 0].tolist()} are in none of the parts")
    routes = None if any(part.routes is None for part in parts) else [
        torch.cat(layer)[index] for layer in zip(*(part.routes for part in parts))]
    return OldPolicy(rows, torch.cat([part.logp for part in parts])[index], routes)


def rows_logprobs(model, rollout: Rollout, rows: torch.Tensor, ctx: StepContext,
                  routing: Optional[MoERouting] = None) -> OldPolicy:
    """log π (and with `routing` the experts chosen) of `rows` under `model`, without gradient, one
    micro-batch at a time (`trainer.micro_batch_size`/`micro_batch_tokens`): peak memory is one
    micro-batch's pass, and rows do not interact in the forward pass, so the values are those of
    one pass over the rows."""
    tc, T = ctx.cfg.trainer, rollout.response_mask.shape[1]
    if rows.numel() == 0:
        return OldPolicy(rows, rollout.response_mask.new_zeros(0, T), None)
    with torch.no_grad():
        parts = [OldPolicy(micro.rows, *score_rows(model, rollout, micro, tc.temperature, tc.logprob_chunk_tokens,
                                                   routing))
                 for micro in plan_micro_batches(rollout, rows, tc.micro_batch_size, tc.micro_batch_tokens, ctx.env)]
    return gather_rows(parts, rows)


def old_logprobs(sampler, rollout: Rollout, ctx: StepContext, minibatches: Sequence[torch.Tensor]) -> OldPolicy:
    """π_old of the rows of `minibatches` (none: an empty `OldPolicy`), with its experts when they are kept."""
    rows = torch.cat(list(minibatches)) if minibatches else torch.empty(0, dtype=torch.long)
    return rows_logprobs(sampler, rollout, rows, ctx, ctx.routing if keeps_old_routes(ctx) else None)


def complete_old_policy(parts: Sequence[OldPolicy], num_seqs: int) -> OldPolicy:
    """π_old of every row, in row order, from parts that together cover each row once."""
    rows = torch.cat([part.rows for part in parts])
    if rows.numel() != num_seqs or torch.unique(rows).numel() != num_seqs:
        raise ValueError(f"π_old parts cover {torch.unique(rows).numel()} distinct of {rows.numel()} rows, "
                         f"not each of the batch's {num_seqs} rows once")
    return gather_rows(parts, torch.arange(num_seqs, device=rows.device))


def reference_logprobs(ref_model, rollout: Rollout, ctx: StepContext) -> torch.Tensor:
    """log π_ref [N, T] of every row, one micro-batch at a time (as for π_old)."""
    rows = torch.arange(rollout.input_ids.shape[0], device=rollout.input_ids.device)
    return rows_logprobs(ref_model, rollout, rows, ctx).logp


def predicting_tokens(rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """[n, P + T] 1 on the tokens of `rows` whose outputs give the response's log-probabilities:
    from the last prompt token to the one before the last response token (as `routing/changed_fraction` counts)."""
    T = rollout.response_mask.shape[1]
    predicting = torch.zeros(rollout.attention_mask[rows].shape, device=rollout.response_mask.device)
    predicting[:, -T - 1:-1] = rollout.response_mask[rows]
    return predicting


class Scored(NamedTuple):
    """A sampled, scored rollout batch with its advantages: what does not depend on the policy
    that trains on it (N = this rank's prompts × G). `trainer.staleness` queues these (`stale.py`)."""

    rollout: Rollout  # the sampler's (behaviour policy's) tokens, log-probabilities and experts
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    metrics: dict[str, float]  # figures of these rows: reward components, uniform groups, dynamic sampling, ...


def sample_scored(policy, ctx: StepContext, stream: PromptStream) -> tuple[Scored, dict[str, float]]:
    """Sample and score a batch (refilled by dynamic sampling if set) and compute its advantages;
    also returns the time it took (`time/*`)."""
    tc, algo = ctx.cfg.trainer, ctx.cfg.algo
    timings: dict[str, float] = {}
    sampler = unwrap(policy)  # DDP's forward hooks are for training passes only
    sampler.eval()
    draw = lambda: sample_and_score(sampler, ctx, stream, timings)  # noqa: E731
    if algo.dynamic_sampling:
        filled = fill_with_informative_groups(draw, tc.prompts_per_step // ctx.env.world_size, tc.group_size,
                                              algo.max_refill_rounds, ctx.tokenizer.pad_token_id,
                                              lambda short: all_reduce_any(short, ctx.env))
        rollout, rewards = filled.rollout, filled.rewards
        timings.update(filled.metrics)
        if filled.warning:
            warnings.warn(filled.warning, stacklevel=2)
    else:
        rollout, rewards = draw()
    sampler.train()
    mask = rollout.response_mask

    shaped = rewards
    if algo.overlong_buffer > 0:
        penalty = overlong_penalty(mask.sum(1), tc.max_new_tokens, algo.overlong_buffer * tc.max_new_tokens,
                                   algo.overlong_penalty)
        shaped = rewards + penalty
        timings["reward/overlong_penalty"] = penalty.mean().item()
    # From every rank's rewards, so a batch-wide statistic (algo.adv_scale=batch-std) is the
    # whole batch's, as in one process; this rank keeps its own rows.
    n, rank = shaped.shape[0], ctx.env.rank
    every_rank = all_gather_rows(shaped, ctx.env)
    advantages = compute_advantages(every_rank, tc.group_size, algo.adv_baseline,
                                    algo.adv_scale)[rank * n:(rank + 1) * n]
    # Groups whose G rewards were all equal: zero advantage, no gradient (of all ranks' groups).
    timings["reward/uniform_groups"] = 1.0 - informative_groups(every_rank, tc.group_size).float().mean().item()
    rows_metrics = {name: value for name, value in timings.items() if not name.startswith("time/")}
    return Scored(rollout, rewards, advantages, rows_metrics), {
        name: value for name, value in timings.items() if name.startswith("time/")}


def prepare_batch(policy, ctx: StepContext, scored: Scored) -> tuple[Batch, dict[str, float]]:
    """Bind a scored batch to the policy about to train on it: the first epoch's mini-batch order,
    π_old (recomputed by this policy, with the experts it chose, or the sampler's numbers) and
    log π_ref. With `trainer.staleness=0` this policy sampled the batch; with k > 0 the policy of
    k steps ago did, and a recomputed π_old is the proximal policy, not the behaviour one (`stale.py`)."""
    tc, algo, rollout = ctx.cfg.trainer, ctx.cfg.algo, scored.rollout
    timings: dict[str, float] = {}
    mask = rollout.response_mask
    sampler = unwrap(policy)  # DDP's forward hooks are for training passes only
    sampler.eval()
    start = time.perf_counter()
    order = torch.randperm(mask.shape[0], generator=ctx.generator)  # the first epoch's mini-batches
    if old_logp_source(ctx.cfg) == "recompute":  # all but the first mini-batch: see update_policy
        old = old_logprobs(sampler, rollout, ctx, order.chunk(tc.num_minibatches)[1:])
    else:  # the sampler's numbers; the gap is measured on the first mini-batch (update_policy)
        old = OldPolicy(torch.arange(mask.shape[0], device=mask.device), rollout.logp, rollout.routes)
    if old.routes is not None:
        timings["routing/replay_cache_mb"] = routes_megabytes(old.routes)
        timings.update(load_balance_metrics(old.routes, predicting_tokens(rollout, old.rows), ctx.routing.num_experts))
    timings["time/old_logp_s"] = time.perf_counter() - start

    ref_logp = None
    if ctx.ref_model is not None:
        ref_logp = reference_logprobs(ctx.ref_model, rollout, ctx)
    sampler.train()
    # π_old's entropy is the sampler's: the same distribution, and no further pass is needed for it
    # (with trainer.staleness > 0, the behaviour policy's).
    loss_mask = None
    if algo.mask_truncated and rollout.truncated is not None:  # DAPO's overlong filtering (§3.4)
        loss_mask = mask * (~rollout.truncated).to(mask.dtype)[:, None]
    return Batch(rollout, scored.rewards, scored.advantages, rollout.entropy, order, old, ref_logp,
                 loss_mask), timings


def collect_rollout(policy, ctx: StepContext, stream: PromptStream) -> tuple[Batch, dict[str, float]]:
    """Sample and score a batch, then bind it to the policy that sampled it (`trainer.staleness=0`):
    the advantages, π_old (with the experts it chose), the sampler/trainer gap and log π_ref."""
    scored, timings = sample_scored(policy, ctx, stream)
    batch, prepared = prepare_batch(policy, ctx, scored)
    return batch, {**timings, **scored.metrics, **prepared}


def rollout_metrics(batch: Batch, env: DistEnv) -> dict[str, float]:
    """Reward, length and entropy statistics of a rollout batch (`reward/std`: of all ranks' rewards)."""
    mask, truncated = batch.rollout.response_mask, batch.rollout.truncated
    return {
        "reward/mean": batch.rewards.mean().item(),
        "reward/std": all_gather_rows(batch.rewards, env).std().item(),
        "response_length/mean": mask.sum(1).mean().item(),
        "entropy": masked_mean(batch.entropy, mask).item(),
        **({} if truncated is None else {"response/truncated_fraction": truncated.float().mean().item()}),
    }


def reduce_over_ranks(metrics: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Every metric over the whole batch, so rank 0 logs global values: a maximum (`*_max`)
    stays the maximum over ranks, a minimum (`*_min`) the minimum, and the others are averaged
    (shards hold equal numbers of sequences; token-weighted figures arrive weighted by global
    counts, see `update_policy`)."""
    if not env.distributed:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64)
    sign = torch.tensor([-1.0 if n.endswith("_min") else 1.0 for n in names], dtype=torch.float64)
    means = all_reduce_sum(values, env) / env.world_size
    extremes = all_reduce_max(sign * values, env) * sign  # min = -max(-x)
    return {n: (extremes[i] if n.endswith(("_max", "_min")) else means[i]).item() for i, n in enumerate(names)}
