"""The RL training loop: rollout → reward → advantages → mini-batch updates → metrics → eval → save.

`train(cfg, run_dir)` runs in one process or on every rank of a torchrun job. The loop
itself is `loop_steps`; what each step does is in `steps.py`.
"""

from __future__ import annotations

import random
import resource
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from gspo_cli.algo.advantages import BASELINES, SCALES
from gspo_cli.algo.aggregation import AGGREGATIONS, aggregation_warning
from gspo_cli.algo.kl import KL_ESTIMATORS
from gspo_cli.algo.losses import LOSSES
from gspo_cli.algo.rollout_correction import CORRECTIONS
from gspo_cli.config import TrainConfig
from gspo_cli.data.tasks import PromptStream, Task, build_task
from gspo_cli.models.loading import load_tokenizer
from gspo_cli.models.lora import AdaptersOff, is_adapted, trainable_parameters
from gspo_cli.models.routing import MoERouting, is_moe
from gspo_cli.report.eval_records import problems_digest
from gspo_cli.report.logs import RunLogger
from gspo_cli.rollout.engines import engine_conflicts
from gspo_cli.train.checkpoint import (
    gather_per_rank,
    gather_rng_states,
    is_sharded,
    latest_checkpoint,
    load_sharded_model,
    load_trainer_state,
    own_rng_state,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from gspo_cli.train.distributed import (DistEnv, barrier, check_shared_run_dir, gathered_for_generation,
                                        init_distributed, shutdown, unwrap)
from gspo_cli.train.guards import BadStepCounter, CollapseMonitor, NoSignalMonitor, TrainingDiverged
from gspo_cli.train.host import configure_host
from gspo_cli.train.model_loading import load_policy, load_reference
from gspo_cli.train.precision import autocast
from gspo_cli.train.stale import RolloutQueue, check_saved_queue, staleness_pitfall
from gspo_cli.train.steps import (
    StepContext,
    evaluate,
    gather_correct,
    old_logp_source,
    reduce_over_ranks,
    rollout_correction,
    rollout_metrics,
)
from gspo_cli.train.update import update_policy
from gspo_cli.train.warmstart import warm_started_dir


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
    if cfg.model.path.startswith((".", "/", "~")) and not Path(cfg.model.path).expanduser().exists():
        raise ValueError(f"model.path={cfg.model.path}: no such directory")
    return cfg.model.path


def check_config(cfg: TrainConfig, env: DistEnv) -> None:
    """Fail before any work on options that name none of their choices or do not fit together."""
    algo, tc = cfg.algo, cfg.trainer
    choices = {"loss": list(LOSSES), "loss_agg": AGGREGATIONS, "adv_baseline": BASELINES, "adv_scale": SCALES,
               "kl_estimator": KL_ESTIMATORS, "old_logp": ("auto", "recompute", "rollout"),
               "rollout_correction": CORRECTIONS}
    for key, valid in choices.items():
        if getattr(algo, key) not in valid:
            raise ValueError(f"algo.{key}={getattr(algo, key)!r} is not one of {sorted(valid)}")
    if rollout_correction(cfg)[0] != "none" and old_logp_source(cfg) != "recompute":
        raise ValueError("algo.rollout_correction (or algo.tis_cap) corrects π_old recomputed by the trainer "
                         "for the sampler's numbers: it needs algo.old_logp=recompute")
    mode, cap = rollout_correction(cfg)
    if algo.rollout_correction_cap_low is not None and not mode.startswith("mis"):
        raise ValueError(f"algo.rollout_correction_cap_low is the lower bound of the masked modes (mis-*); "
                         f"algo.rollout_correction={mode} does not use it")
    low = 1.0 / cap if algo.rollout_correction_cap_low is None else algo.rollout_correction_cap_low  # 0: no floor
    if mode.startswith("mis") and low >= cap:
        raise ValueError(f"algo.rollout_correction={mode} keeps ratios in [cap_low, cap]: "
                         f"algo.rollout_correction_cap={cap} leaves that band empty (cap_low {low:g}); raise the cap")
    if tc.staleness < 0:
        raise ValueError(f"trainer.staleness={tc.staleness}: the steps a rollout waits to be trained on, 0 or more")
    if tc.ppo_epochs < 1:
        raise ValueError(f"trainer.ppo_epochs={tc.ppo_epochs}: at least one pass over the rollout batch")
    if tc.prompts_per_step % env.world_size:
        raise ValueError(f"trainer.prompts_per_step={tc.prompts_per_step} does not split across {env.world_size} ranks")
    if (tc.prompts_per_step // env.world_size * tc.group_size) % tc.num_minibatches:
        raise ValueError(f"the rollout batch ({tc.prompts_per_step} prompts × {tc.group_size} responses"
                         f"{f' / {env.world_size} ranks' if env.distributed else ''}) does not split into "
                         f"trainer.num_minibatches={tc.num_minibatches} mini-batches")
    if cfg.hardware.precision not in ("fp32", "bf16"):
        raise ValueError(f"hardware.precision={cfg.hardware.precision!r} is not one of ['bf16', 'fp32']")
    if cfg.hardware.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"hardware.strategy={cfg.hardware.strategy!r} is not one of ['ddp', 'fsdp']")
    replays_sampler_routes = algo.routing_replay and old_logp_source(cfg) == "rollout"
    problem = engine_conflicts(tc.rollout_engine, replays_sampler_routes,
                               fsdp=env.distributed and cfg.hardware.strategy == "fsdp")
    if problem:
        raise ValueError(problem)


def config_pitfalls(cfg: TrainConfig) -> list[str]:
    """Settings that run but are likely not what the user wants, as one warning each."""
    pitfalls = [aggregation_warning(cfg.algo.loss, cfg.algo.loss_agg)]
    if cfg.model.dtype != "float32":
        pitfalls.append(
            f"model.dtype={cfg.model.dtype}: AdamW updates {cfg.model.dtype} weights with no float32 master "
            "copy, so small updates round away (GSPO's clip range, 4e-4, is below bfloat16's resolution of "
            "~4e-3). For fp32 master weights with bf16 compute: model.dtype=float32 hardware.precision=bf16.")
    pitfalls.append(staleness_pitfall(cfg))
    return [p for p in pitfalls if p]


def resume_point(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from: the latest in the run directory (`resume=auto`), a given one, or None."""
    if cfg.resume == "auto":
        return latest_checkpoint(run_dir)
    return Path(cfg.resume) if cfg.resume else None


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the model weights."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: PromptStream
    generator: torch.Generator  # CPU: mini-batch order, and sampling on CPU
    sampling_generator: Optional[torch.Generator] = None  # sampling on a GPU (generators are per device)
    step: int = 0  # completed RL steps
    queue: RolloutQueue = field(default_factory=lambda: RolloutQueue(0))  # `trainer.staleness`'s rollouts

    def to_dict(self, wandb_id: Optional[str], rng: list[dict[str, Any]],
                rollouts: Optional[list[list[dict[str, Any]]]] = None) -> dict[str, Any]:
        """What a checkpoint's trainer_state.pt holds; `rng`: every rank's `rng_state` (`gather_rng_states`);
        `rollouts`: every rank's `RolloutQueue.state`, with `trainer.staleness` > 0 only."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "stream": self.stream.state(), "rng": rng, "wandb_id": wandb_id,
                **({"rollouts": rollouts} if rollouts is not None else {})}


# ---------------------------------------------------------------------------- set-up


def setup(cfg: TrainConfig, run_dir: Path, env: DistEnv, log) -> tuple[Any, Any, Task, TrainState]:
    """Load task, model (from a checkpoint when resuming), optimizer and stream."""
    tc = cfg.trainer
    task = build_task(cfg.task)
    resume_from = resume_point(cfg, run_dir)
    if cfg.resume and resume_from is None:
        log(f"resume=auto: no complete checkpoint in {run_dir}/checkpoints, starting from scratch")
    if env.distributed:  # rank 0 builds and warm-starts the shared cache; the others then find it there
        if env.is_main:
            resolve_model_path(cfg, task, log)
        barrier(env)
    sharded = resume_from is not None and is_sharded(resume_from)
    start_path = resolve_model_path(cfg, task, log)
    saved_model = resume_from / "model" if resume_from and not sharded else None
    policy = load_policy(cfg, start_path, saved_model, env)  # wrapped: DDP, FSDP2 or as is
    if is_adapted(policy):
        log(f"model.lora: {sum(p.numel() for p in trainable_parameters(policy)):,} of "
            f"{sum(p.numel() for p in policy.parameters()):,} parameters train")
    tokenizer = load_tokenizer(str(saved_model or start_path), cfg.model.trust_remote_code)
    task = task.for_tokenizer(tokenizer)  # the chat template, when task.chat_template is set
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=cfg.hardware.fused_adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0)
    saved = load_trainer_state(resume_from) if resume_from else {}
    rng = own_rng_state(saved, env) if saved else None
    # Each rank draws its own samples. A resume by another number of ranks cannot continue each
    # rank's draws: every rank then seeds afresh from (seed, step, rank), not to repeat step 0's.
    rank_seed = cfg.seed + env.rank if rng is not None or not saved else \
        int(np.random.SeedSequence([cfg.seed, saved["step"], env.rank]).generate_state(1)[0])
    state = TrainState(optimizer, scheduler, PromptStream(task.train, cfg.seed), seed_everything(rank_seed),
                       queue=RolloutQueue(tc.staleness))
    if env.device != "cpu":
        state.sampling_generator = torch.Generator(device=env.device).manual_seed(rank_seed)
    if resume_from:
        if sharded:  # model and optimizer resharded onto this run's ranks by DCP
            load_sharded_model(policy, resume_from, optimizer)
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.stream.load_state(saved["stream"])
        if rng is not None:
            set_rng_state(rng, state.generator, state.sampling_generator)
        else:
            log(f"warning: {resume_from} holds the random states of {len(saved['rng'])} rank(s), not "
                f"{env.world_size}: each rank samples from a fresh seed, not as the saved run would have")
        state.step = saved["step"]
        state.queue.load_state(saved["rollouts"][env.rank] if tc.staleness else [], env.device)
        log(f"resumed from {resume_from} at step {state.step}")
    return policy, tokenizer, task, state


def make_context(cfg: TrainConfig, policy, tokenizer, task: Task, env: DistEnv, state: TrainState) -> StepContext:
    """Routing hooks for MoE models and the reference model when a KL penalty is set: a frozen
    copy, or with LoRA the policy with its adapters off."""
    model = unwrap(policy)
    routing = MoERouting(model) if is_moe(model) else None  # raises for MoE layers it cannot hook
    if cfg.algo.routing_replay and routing is None:
        raise ValueError(f"algo.routing_replay needs a Mixture-of-Experts model; {cfg.model.name} is dense")
    ref_model = None
    if cfg.algo.kl_coef != 0 and is_adapted(model):  # the base model is the policy with its adapters off
        ref_model = AdaptersOff(model)
    elif cfg.algo.kl_coef != 0:  # a frozen copy of the starting policy, loaded only when needed
        ref_model = load_reference(cfg, resolve_model_path(cfg, task, print), env)
    return StepContext(cfg, task, tokenizer, env, state.generator, routing, ref_model, state.sampling_generator)


def peak_memory(device: str) -> dict[str, float]:
    """Peak resident host memory of this process and, on a GPU, peak allocated GPU memory (GiB)."""
    peak = {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if device.startswith("cuda"):
        peak["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def install_stop_signals() -> dict[str, bool]:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step; a second SIGINT aborts."""
    flag = {"stop": False}

    def request_stop(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    return flag


# ---------------------------------------------------------------------------- loop


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Run RL training as configured; returns the last metrics record (on every rank)."""
    run_dir = Path(run_dir)
    configure_host(cfg.hardware.num_threads, cfg.hardware.keep_freed_memory, cfg.hardware.device,
                   cfg.trainer.max_new_tokens)
    env = init_distributed(cfg.hardware.device)
    try:
        record = train_in_group(cfg, run_dir, env)
    except BaseException:
        shutdown(env)
        raise
    shutdown(env, finished=True)  # the model and its DDP reducer died with train_in_group's frame
    return record


def train_in_group(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> dict[str, Any]:
    """Everything that holds the model and the process group; all of it is freed on return,
    before the group is destroyed (`distributed.shutdown`)."""
    check_config(cfg, env)
    check_shared_run_dir(run_dir, env)
    pitfalls = config_pitfalls(cfg)
    for pitfall in pitfalls:
        warnings.warn(pitfall, stacklevel=3)
    resumed = resume_point(cfg, run_dir)
    saved = load_trainer_state(resumed) if resumed else {}  # to continue the same W&B run and log
    check_saved_queue(saved, cfg.trainer.staleness, env.world_size, resumed)  # before any model is loaded
    run_name = cfg.run_name or f"{cfg.algo.name}-{cfg.model.name}-s{cfg.seed}"
    plain_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    with RunLogger(run_dir, cfg.logger, plain_cfg, run_name, total_steps=cfg.trainer.max_steps,
                   enabled=env.is_main, resume_id=saved.get("wandb_id"), start_step=saved.get("step", 0)) as logger:
        for pitfall in pitfalls:
            logger.print(f"warning: {pitfall}")
        policy, tokenizer, task, state = setup(cfg, run_dir, env, logger.print)
        ctx = make_context(cfg, policy, tokenizer, task, env, state)
        return run_loop(cfg, run_dir, policy, ctx, state, logger)


def run_loop(cfg: TrainConfig, run_dir: Path, policy, ctx: StepContext, state: TrainState,
             logger: RunLogger) -> dict[str, Any]:
    """Steps from `state.step` to `trainer.max_steps`, then the final model."""
    hw = cfg.hardware
    with autocast(ctx.env.device, hw.precision, hw.strategy, ctx.env.distributed):  # bf16 when asked
        record = loop_steps(cfg, run_dir, policy, ctx, state, logger)
    if cfg.trainer.save_final and state.step >= cfg.trainer.max_steps:
        save_final_model(policy, ctx, run_dir / "checkpoints" / "final", logger)
    return record


def save_resumable(cfg: TrainConfig, run_dir: Path, policy, ctx: StepContext, state: TrainState,
                   logger: RunLogger) -> None:
    """A checkpoint to resume from: sharded by every rank under FSDP2, else written by rank 0."""
    env, keep = ctx.env, cfg.trainer.keep_last
    rng = gather_rng_states(rng_state(state.generator, state.sampling_generator), env)  # every rank's, on rank 0
    rollouts = gather_per_rank(state.queue.state(), env) if cfg.trainer.staleness else None  # each rank its own
    trainer_state = state.to_dict(logger.wandb_id, rng, rollouts)
    if env.distributed and cfg.hardware.strategy == "fsdp":
        save_sharded_checkpoint(run_dir, state.step, policy, state.optimizer, ctx.tokenizer, trainer_state, keep,
                                env.is_main)
    elif env.is_main:
        save_checkpoint(run_dir, state.step, unwrap(policy), ctx.tokenizer, trainer_state, keep)


def loop_steps(cfg: TrainConfig, run_dir: Path, policy, ctx: StepContext, state: TrainState,
               logger: RunLogger) -> dict[str, Any]:
    """eval → rollout → update → log → checkpoint, step after step; returns early on a stop signal."""
    tc, env = cfg.trainer, ctx.env
    checkpoint = lambda: save_resumable(cfg, run_dir, policy, ctx, state, logger)  # noqa: E731
    stop = install_stop_signals()
    bad_steps, collapse = BadStepCounter(tc.max_bad_steps), CollapseMonitor()
    no_signal = NoSignalMonitor(tc.no_signal_warn_steps)
    record: dict[str, Any] = {}
    for step in range(state.step, tc.max_steps + 1):
        eval_metrics = {}
        if step % tc.eval_every == 0 or step == tc.max_steps:
            with gathered_for_generation(policy, cfg.hardware.gather_for_rollout):
                eval_metrics, samples = evaluate(policy, ctx)  # greedy, the held-out problems shared across ranks
            logger.log_samples(step, samples[:tc.eval_samples_logged])
            # which problems were answered right, every rank's share: what `gspo report` pairs runs on
            logger.log_eval_correct(step, problems_digest(ctx.task.eval), gather_correct(samples, ctx))
        if step == tc.max_steps:  # the last record holds only the final evaluation
            record = {**record, **eval_metrics}
            logger.log(eval_metrics, step)
            break

        start = time.perf_counter()
        batch, timings = state.queue.next_batch(policy, ctx, state.stream, step)  # rollout (k steps old), π_old
        update_start = time.perf_counter()
        update_metrics = update_policy(policy, state.optimizer, state.scheduler, batch, ctx)  # mini-batch steps
        timings["time/update_s"] = time.perf_counter() - update_start
        timings["time/step_s"] = time.perf_counter() - start
        state.step = step + 1

        record = reduce_over_ranks({
            **rollout_metrics(batch, env), **update_metrics, **timings,
            "lr": state.scheduler.get_last_lr()[0],
            "throughput/tokens_per_s": batch.rollout.response_mask.sum().item() / timings["time/step_s"],
        }, env)
        record["throughput/tokens_per_s"] *= env.world_size  # tokens of all ranks
        record.update(peak_memory(env.device))
        record.update(eval_metrics)
        logger.log(record, step)

        warning = collapse.update(record["reward/mean"], record["entropy"])
        if warning:
            logger.print(warning)
        warning = no_signal.update(batch.rewards, tc.group_size, record)
        if warning:
            logger.print(warning)
        if bad_steps.update(int(update_metrics["faults/skipped_steps"]), tc.num_minibatches * tc.ppo_epochs):
            checkpoint()  # skipped updates left the weights as they were: the last good state
            raise TrainingDiverged(
                f"{bad_steps.in_a_row} steps in a row had only non-finite losses or gradients "
                f"(trainer.max_bad_steps={tc.max_bad_steps}); the last good state is saved in "
                f"{run_dir}/checkpoints/step_{state.step}. Lower trainer.lr or check the reward.")
        if stop["stop"]:
            checkpoint()
            logger.print(f"stopped by a signal after step {step}; continue with "
                         f"`gspo train resume=auto hydra.run.dir={run_dir}`")
            return record
        if tc.save_every and state.step % tc.save_every == 0 and state.step < tc.max_steps:
            checkpoint()
    return record


def save_final_model(policy, ctx: StepContext, final_dir: Path, logger: RunLogger) -> None:
    """Write the trained model as an ordinary Hugging Face directory (gathered from FSDP shards);
    with LoRA, the adapters only, in `peft`'s format (`gspo export` merges them into the base)."""
    model = unwrap(policy)
    state_dict = None
    if ctx.env.distributed and ctx.cfg.hardware.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.env.is_main:
        model.save_pretrained(final_dir, state_dict=state_dict)
        ctx.tokenizer.save_pretrained(final_dir)
        logger.print(f"saved the trained model to {final_dir}")
