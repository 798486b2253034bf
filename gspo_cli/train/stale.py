"""Stale rollouts (`trainer.staleness=k`): the update of step t trains on the rollout batch that
the policy of step t − k sampled, as a trainer whose sampler runs k steps ahead of it would
(AReaL's `max_head_offpolicyness`, prime-rl's `max_async_level`). A research knob to study
off-policy lag on one process, in lockstep: it makes nothing faster.

Three policies meet in the update of step t (docs/algorithms.md, "Stale rollouts"):

- the behaviour policy μ = π_{θ_{t−k}}, which sampled the rows: its log-probabilities are the
  sampler's (`rollout.logp`), its experts `rollout.routes`;
- the proximal policy π_prox = π_{θ_t}, the weights at the start of the update: what
  `algo.old_logp=recompute` computes (`steps.prepare_batch` runs when the batch leaves the queue);
- the current policy π_θ, which moves with every mini-batch's optimizer step.

`algo.old_logp` picks the ratio's denominator: `rollout` divides by μ (PPO clipped around the
behaviour policy, as prime-rl does); `recompute` by π_prox, and `algo.rollout_correction`
weights the loss by π_prox/μ: decoupled PPO (Hilton et al. 2021, arXiv 2110.00296; AReaL's
decoupled loss). With k = 0, μ and π_prox are the same weights and the queue passes each batch
straight through: the run is the one without a queue, bit for bit.

The queue starts as AReaL's and prime-rl's samplers do, which run ahead of the trainer from
the initial weights: step 0 samples k + 1 batches with θ_0 and trains on the first, so step
t ≤ k trains on a batch of θ_0 (lag t) and every later step on one of θ_{t−k} (lag k). Each step
then samples one batch, so after every step the queue holds the next k batches (the last k are
sampled and never trained on). Every rank queues its own rows; a checkpoint carries every rank's
queue (`state`, gathered like the random states), and a resume needs the same staleness and
number of ranks.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple, Optional

import torch

from gspo_cli.config import TrainConfig
from gspo_cli.data.tasks import PromptStream
from gspo_cli.rollout.generate import Rollout
from gspo_cli.train.steps import (Batch, Scored, StepContext, old_logp_source, prepare_batch, rollout_correction,
                                  sample_scored)


class Queued(NamedTuple):
    """A scored batch waiting to be trained on."""

    scored: Scored
    sampled_at: int  # the step whose policy (the behaviour policy) sampled it


def to_device(value: Any, device) -> Any:
    """Tensors (also inside lists) moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


class RolloutQueue:
    """A FIFO of k scored rollout batches, sampled at earlier steps (k = `trainer.staleness`)."""

    def __init__(self, staleness: int):
        self.staleness = staleness
        self.waiting: deque[Queued] = deque()

    def next_batch(self, policy, ctx: StepContext, stream: PromptStream, step: int) -> tuple[Batch, dict[str, float]]:
        """Sample with the current policy what the queue lacks (k + 1 batches at the start, then
        one), and return the oldest batch bound to the current policy (`steps.prepare_batch`),
        with its figures and this step's timings."""
        timings: dict[str, float] = {}
        while len(self.waiting) <= self.staleness:
            scored, spent = sample_scored(policy, ctx, stream)
            for name, value in spent.items():
                timings[name] = timings.get(name, 0.0) + value
            self.waiting.append(Queued(scored, step))
        oldest = self.waiting.popleft()
        batch, prepared = prepare_batch(policy, ctx, oldest.scored)
        lag = {"rollout/policy_lag": float(step - oldest.sampled_at)} if self.staleness else {}
        return batch, {**timings, **oldest.scored.metrics, **prepared, **lag}

    def state(self) -> list[dict[str, Any]]:
        """The queued batches, oldest first, as weights-only-loadable values (tensors on the CPU)."""
        return [{"rollout": {name: to_device(value, "cpu") for name, value in q.scored.rollout._asdict().items()},
                 "rewards": q.scored.rewards.cpu(), "advantages": q.scored.advantages.cpu(),
                 "metrics": dict(q.scored.metrics), "sampled_at": q.sampled_at} for q in self.waiting]

    def load_state(self, saved: list[dict[str, Any]], device) -> None:
        """Restore what `state` saved, its tensors on `device`."""
        self.waiting = deque(
            Queued(Scored(Rollout(**{name: to_device(value, device) for name, value in q["rollout"].items()}),
                          q["rewards"].to(device), q["advantages"].to(device), dict(q["metrics"])), q["sampled_at"])
            for q in saved)


def check_saved_queue(saved: dict[str, Any], staleness: int, world_size: int, checkpoint) -> None:
    """Refuse a resume that cannot continue the saved queue: another staleness, or (with k > 0)
    another number of ranks, whose rows would not be the ones each rank queued. No checkpoint: nothing to check."""
    if not saved:
        return
    queues = saved.get("rollouts") or [[]] * world_size
    held = len(queues[0])
    if held != staleness:
        raise ValueError(f"{checkpoint} holds {held} queued rollout batch(es) per rank, but trainer.staleness="
                         f"{staleness} needs {staleness}: resume with the trainer.staleness the run was started with")
    if staleness and len(queues) != world_size:
        raise ValueError(f"{checkpoint} holds the queued rollouts of {len(queues)} rank(s), not {world_size}: each "
                         f"rank trains on the rows it queued, so a resume with trainer.staleness={staleness} needs "
                         f"{len(queues)} rank(s)")


def staleness_pitfall(cfg: TrainConfig) -> Optional[str]:
    """A warning for a stale run that divides by the proximal policy and corrects nothing for the
    behaviour one (decoupled PPO without its importance weight); None otherwise."""
    k = cfg.trainer.staleness
    if k and old_logp_source(cfg) == "recompute" and rollout_correction(cfg)[0] == "none":
        return (f"trainer.staleness={k} with π_old recomputed and no algo.rollout_correction: the ratio is taken "
                "against the proximal policy (the weights at the update) and nothing corrects for the older "
                "policy that sampled the rows. Decoupled PPO weights the loss by their ratio: "
                "algo.rollout_correction=tis-token (or mis-token); algo.old_logp=rollout clips around the sampler's.")
    return None
