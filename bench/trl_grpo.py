"""The same workload through TRL's GRPOTrainer in GSPO mode (`pip install -e .[bench]`).

Settings that make TRL run what `gspo train algo=gspo` runs:
- `importance_sampling_level="sequence"`: GSPO's length-normalised sequence ratio (§4.1).
- `epsilon=3e-4`, `epsilon_high=4e-4`: the paper's clip ranges (§5.1), as `algo=gspo`.
- `steps_per_generation=num_minibatches`, `gradient_accumulation_steps=1`: one rollout batch
  feeds 4 optimizer steps of `N / 4` sequences each. Generation and optimisation are then
  misaligned, so TRL recomputes π_old after sampling. This project takes its sampler's own
  log-probabilities as π_old in float32 (`algo.old_logp=auto`): the same numbers up to rounding.
- `loss_type="grpo"`: the per-sequence mean over tokens, then the mean over sequences.
  With a sequence-level ratio every token of a sequence carries the same term, so this is
  exactly GSPO's mean over sequences (this project's `seq-mean-token-mean`).
- `beta=0`, `router_aux_loss_coef=0`, `scale_rewards="group"`, constant learning rate,
  no top-k/top-p/min-p: no reference model, no load-balancing loss, group-std advantages.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.workload import Workload
from gspo_cli.config import TrainConfig
from gspo_cli.data.tasks import Problem, build_task
from gspo_cli.models.loading import load_tokenizer


def timed_trainer_class():
    """GRPOTrainer with wall-clock timers around its phases (imported lazily: TRL is optional)."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class LoopTimer(TrainerCallback):
        """Times the training loop only: model loading, optimizer and data loader set-up stay out,
        as they do in the project's `time/step_s`. Before optimizer step `warmup_optimizer_steps`
        (where the first timed rollout batch is generated) it notes the counters so far."""

        def __init__(self, trainer: "TimedGRPOTrainer") -> None:
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.phase_s["train_s"] = -time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            trainer = self.trainer
            if state.global_step == trainer.warmup_optimizer_steps:
                elapsed = trainer.phase_s["train_s"] + time.perf_counter()
                trainer.at_warmup_end = {**trainer.phase_s, **trainer.token_counts, "train_s": elapsed}

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer.phase_s["train_s"] += time.perf_counter()

    class TimedGRPOTrainer(GRPOTrainer):
        """Adds up the seconds spent in each phase and counts the tokens it generated."""

        def __init__(self, *args: Any, warmup_optimizer_steps: int = 0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.phase_s: dict[str, float] = defaultdict(float)
            self.token_counts: dict[str, int] = defaultdict(int)
            self.warmup_optimizer_steps = warmup_optimizer_steps
            self.at_warmup_end: dict[str, float] = {}  # phase_s and token_counts when the warm-up ended
            self.add_callback(LoopTimer(self))

        def _generate(self, prompts):
            start = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self.phase_s["generate_s"] += time.perf_counter() - start

        def _calculate_rewards(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._calculate_rewards(*args, **kwargs)
            finally:
                self.phase_s["reward_s"] += time.perf_counter() - start

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the policy update's own forward pass
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            start = time.perf_counter()  # no gradient: π_old (there is no reference model)
            try:
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            finally:
                self.phase_s["old_logp_s"] += time.perf_counter() - start

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            self.phase_s["rollout_s"] += time.perf_counter() - start
            self.token_counts["response"] += int(output["completion_mask"].sum())
            self.token_counts["prompt"] += int(output["prompt_mask"].sum())
            self.token_counts["completions"] += int(output["completion_mask"].shape[0])
            return output

    return TimedGRPOTrainer


def grpo_config(workload: Workload, output_dir: Path):
    """TRL's GRPOConfig for `workload` (see the module docstring for why each value)."""
    from trl import GRPOConfig

    w = workload
    return GRPOConfig(
        output_dir=str(output_dir), report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=w.device == "cpu", bf16=w.precision == "bf16", fp16=False, seed=w.seed, dataloader_num_workers=0,
        per_device_train_batch_size=w.rollout_size // w.num_minibatches, gradient_accumulation_steps=1,
        steps_per_generation=w.num_minibatches, num_generations=w.group_size, num_iterations=1,
        max_steps=w.total_steps * w.num_minibatches, max_completion_length=w.max_new_tokens,
        temperature=w.temperature, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, loss_type="grpo",
        beta=0.0, router_aux_loss_coef=0.0, scale_rewards="group", mask_truncated_completions=False,
        shuffle_dataset=False, log_completions=False,
    )


def run_trl(workload: Workload, cfg: TrainConfig, model_dir: Path, problems: list[Problem],
            run_dir: Path) -> dict[str, Any]:
    """Train `workload` with TRL from `model_dir` on `problems`; return timings and token counts."""
    import trl
    from datasets import Dataset

    if workload.num_threads > 0:
        torch.set_num_threads(workload.num_threads)
    task = build_task(cfg.task)  # the project's own reward, so both score alike

    def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return task.score(completions, answer)[0]

    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})
    trainer = timed_trainer_class()(
        model=str(model_dir), reward_funcs=exact_match, args=grpo_config(workload, run_dir),
        train_dataset=dataset, processing_class=load_tokenizer(model_dir),
        warmup_optimizer_steps=workload.warmup_steps * workload.num_minibatches,
    )
    trainer.train()
    totals = {**trainer.phase_s, **trainer.token_counts}
    warmup = trainer.at_warmup_end
    timed = {name: value - warmup.get(name, 0) for name, value in totals.items()}
    return {"framework": "trl", "version": trl.__version__, **trl_summary(timed, workload.steps),
            "warmup": trl_summary(warmup, workload.warmup_steps) if workload.warmup_steps else None}


def trl_summary(counters: dict[str, float], steps: int) -> dict[str, Any]:
    """Seconds per phase and token counts from the timed trainer's counters over `steps` rollout batches."""
    phases = {name: counters.get(name, 0.0) for name in ("generate_s", "old_logp_s", "reward_s")}
    # everything outside the rollout: forward, backward and optimizer step
    phases["update_s"] = counters["train_s"] - counters.get("rollout_s", 0.0)
    return {"timed_s": counters["train_s"], "phases": phases, "response_tokens": int(counters.get("response", 0)),
            "prompt_tokens": int(counters.get("prompt", 0)), "completions": int(counters.get("completions", 0)),
            "steps": steps}
