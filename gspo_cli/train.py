"""The RL training loop: rollout → reward → advantages → mini-batch updates → metrics → eval → save."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from gspo_cli.advantages import group_normalized_advantages
from gspo_cli.config import TrainConfig
from gspo_cli.evaluate import greedy_eval
from gspo_cli.logs import RunLogger
from gspo_cli.losses import LOSSES, masked_mean
from gspo_cli.models import load_model, load_tokenizer
from gspo_cli.rollout import Rollout, generate_rollout, response_logprobs
from gspo_cli.tasks import PromptStream, Task, build_task
from gspo_cli.warmstart import warm_started_dir


class Batch(NamedTuple):
    """A scored rollout batch ready for the policy update (N = prompts × G)."""

    rollout: Rollout
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    old_logp: torch.Tensor  # [N, T] log π_old of the sampled tokens
    entropy: torch.Tensor  # [N, T] entropy of π_old at each response position


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that drives sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_model_path(cfg: TrainConfig, task: Task, log) -> str:
    """The directory or hub id to load: the built (and warm-started) tiny model, or `model.path`."""
    if cfg.model.build is not None and cfg.model.path is None:
        return str(warm_started_dir(cfg.model, cfg.task, Path(cfg.cache_dir).expanduser(),
                                    cfg.trainer.max_new_tokens, task, log))
    if cfg.model.path is None:
        raise ValueError("set model.path to a Hugging Face hub id or a local directory")
    return cfg.model.path


# ---------------------------------------------------------------------------- steps


def collect_rollout(policy, tokenizer, task: Task, stream: PromptStream, cfg: TrainConfig,
                    generator: torch.Generator) -> tuple[Batch, dict[str, float]]:
    """Sample G responses per prompt, score them, and compute advantages and π_old."""
    tc = cfg.trainer
    problems = stream.next_batch(tc.prompts_per_step)
    prompts = [p.prompt for p in problems for _ in range(tc.group_size)]  # groups contiguous
    answers = [p.answer for p in problems for _ in range(tc.group_size)]
    timings = {}

    start = time.perf_counter()
    policy.eval()
    rollout = generate_rollout(policy, tokenizer, prompts, tc.max_new_tokens, tc.temperature, generator)
    timings["time/generate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rewards = torch.tensor([task.reward(c, a) for c, a in zip(rollout.completions, answers)])
    advantages = group_normalized_advantages(rewards, tc.group_size)
    timings["time/reward_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        old_logp, entropy = response_logprobs(policy, rollout.input_ids, rollout.attention_mask,
                                              rollout.response_mask.shape[1], tc.temperature, with_entropy=True)
    timings["time/old_logp_s"] = time.perf_counter() - start
    policy.train()
    return Batch(rollout, rewards, advantages, old_logp, entropy), timings


def update_policy(policy, optimizer, scheduler, batch: Batch, cfg: TrainConfig,
                  generator: torch.Generator) -> dict[str, float]:
    """Split the batch into mini-batches, one optimizer step each; average their metrics."""
    rollout, num_seqs = batch.rollout, batch.rewards.numel()
    order = torch.randperm(num_seqs, generator=generator)
    sums: dict[str, float] = {}
    for indices in order.chunk(cfg.trainer.num_minibatches):
        mask = rollout.response_mask[indices]
        logp, _ = response_logprobs(policy, rollout.input_ids[indices], rollout.attention_mask[indices],
                                    mask.shape[1], cfg.trainer.temperature)
        loss, metrics = LOSSES[cfg.algo.loss](
            logp, batch.old_logp[indices], batch.advantages[indices], mask,
            clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, **cfg.algo.params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.trainer.max_grad_norm)
        optimizer.step()
        scheduler.step()
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value) / cfg.trainer.num_minibatches
    return sums


def rollout_metrics(batch: Batch) -> dict[str, float]:
    """Reward, length and entropy statistics of a rollout batch."""
    mask = batch.rollout.response_mask
    return {
        "reward/mean": batch.rewards.mean().item(),
        "reward/std": batch.rewards.std().item(),
        "response_length/mean": mask.sum(1).mean().item(),
        "entropy": masked_mean(batch.entropy, mask).item(),
    }


# ---------------------------------------------------------------------------- loop


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Run GSPO/GRPO training as configured; returns the final metrics record."""
    if cfg.algo.loss not in LOSSES:
        raise ValueError(f"algo.loss={cfg.algo.loss!r} is not one of {sorted(LOSSES)}")
    tc = cfg.trainer
    if (tc.prompts_per_step * tc.group_size) % tc.num_minibatches:
        raise ValueError(f"the rollout batch ({tc.prompts_per_step} prompts × {tc.group_size}) "
                         f"does not split into {tc.num_minibatches} mini-batches")
    if cfg.hardware.num_threads > 0:
        torch.set_num_threads(cfg.hardware.num_threads)
    generator = seed_everything(cfg.seed)
    run_name = cfg.run_name or f"{cfg.algo.name}-{cfg.model.name}-s{cfg.seed}"
    plain_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    with RunLogger(run_dir, cfg.logger, plain_cfg, run_name, total_steps=tc.max_steps) as logger:
        task = build_task(cfg.task)
        model_path = resolve_model_path(cfg, task, logger.print)
        policy = load_model(model_path, cfg.model.dtype, cfg.hardware.device, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: min(1.0, (i + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0)
        stream = PromptStream(task.train, cfg.seed)
        seed_everything(cfg.seed)  # loading may have consumed random numbers
        record: dict[str, Any] = {}

        for step in range(tc.max_steps + 1):
            if step % tc.eval_every == 0 or step == tc.max_steps:
                eval_metrics, samples = greedy_eval(policy, tokenizer, task, task.eval, tc.max_new_tokens)
                logger.log_samples(step, samples[:tc.eval_samples_logged])
            else:
                eval_metrics = {}
            if step == tc.max_steps:  # the last record holds only the final evaluation
                record = {**record, **eval_metrics}
                logger.log(eval_metrics, step)
                break

            start = time.perf_counter()
            batch, timings = collect_rollout(policy, tokenizer, task, stream, cfg, generator)
            update_start = time.perf_counter()
            update_metrics = update_policy(policy, optimizer, scheduler, batch, cfg, generator)
            timings["time/update_s"] = time.perf_counter() - update_start
            timings["time/step_s"] = time.perf_counter() - start

            record = {
                **rollout_metrics(batch), **update_metrics, **eval_metrics, **timings,
                "lr": scheduler.get_last_lr()[0],
                "throughput/tokens_per_s": batch.rollout.response_mask.sum().item() / timings["time/step_s"],
            }
            logger.log(record, step)

        if tc.save_final:
            final_dir = run_dir / "checkpoints" / "final"
            policy.save_pretrained(final_dir)
            tokenizer.save_pretrained(final_dir)
            logger.print(f"saved the trained model to {final_dir}")
    return record
