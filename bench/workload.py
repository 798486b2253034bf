"""The fixed benchmark workload (issue 9) and the prompts both trainers see."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from gspo_cli.cli import CONF_DIR
from gspo_cli.config import TrainConfig, register_configs
from gspo_cli.data.tasks import Problem, PromptStream, build_task

# Held-out prompts: the trainer always evaluates greedily before step 1 and after the last
# step. Both evaluations fall outside the timed steps; a small held-out set keeps them short.
NUM_EVAL = 8


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration; the defaults are the workload of issue 9."""

    model: str = "bench-qwen3-moe"
    """Entry of `conf/model/`: the model both trainers start from."""
    prompts_per_step: int = 64
    """Prompts in a rollout batch."""
    group_size: int = 8
    """G: responses sampled per prompt (TRL: `num_generations`)."""
    max_new_tokens: int = 64
    """Longest response (TRL: `max_completion_length`)."""
    num_minibatches: int = 4
    """Optimizer steps per rollout batch (TRL: `steps_per_generation`)."""
    steps: int = 1
    """Timed rollout batches per run (TRL runs `(warmup_steps + steps) × num_minibatches` optimizer steps)."""
    warmup_steps: int = 1
    """Rollout batches each run does first, timed apart: a process's first step also pays for
    one-off costs (faulting in fresh memory, lazy initialisation) that later steps do not."""
    lr: float = 1e-4
    """AdamW learning rate, constant, in both trainers."""
    temperature: float = 1.0
    """Sampling temperature; no top-k, top-p or min-p in either trainer."""
    seed: int = 0
    """Seed of both trainers (sampling, data order)."""
    num_threads: int = 0
    """torch CPU threads in each run; 0 keeps torch's default (one per core)."""
    device: str = "cpu"
    """Where both trainers run: "cpu", or "cuda" (this project's `hardware=gpu`, TRL without `use_cpu`)."""
    precision: str = "fp32"
    """fp32, or bf16 (this project's `hardware.precision=bf16` autocast, TRL's `bf16=True`)."""
    model_overrides: tuple[str, ...] = ()
    """Extra Hydra overrides of the model entry (the tests shrink the model with these)."""

    @property
    def total_steps(self) -> int:
        """Rollout batches per run, warm-up included."""
        return self.warmup_steps + self.steps

    @property
    def rollout_size(self) -> int:
        """N: sequences per rollout batch."""
        return self.prompts_per_step * self.group_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Workload:
        return cls(**{**values, "model_overrides": tuple(values.get("model_overrides", ()))})


def project_overrides(workload: Workload, cache_dir: Path) -> list[str]:
    """Hydra overrides that make `gspo train` run `workload` with GSPO and nothing else."""
    w = workload
    return [
        f"model={w.model}", "task=arithmetic", "algo=gspo", "logger=none", f"cache_dir={cache_dir}",
        f"seed={w.seed}", f"task.num_eval={NUM_EVAL}",
        f"trainer.max_steps={w.total_steps}", f"trainer.prompts_per_step={w.prompts_per_step}",
        f"trainer.group_size={w.group_size}", f"trainer.max_new_tokens={w.max_new_tokens}",
        f"trainer.num_minibatches={w.num_minibatches}", f"trainer.lr={w.lr}", "trainer.warmup_steps=0",
        f"trainer.temperature={w.temperature}", "trainer.save_final=false",
        # GSPO and nothing else: TRL measures no routing volatility (an extra forward per mini-batch).
        "algo.routing_volatility=false",
        # Evaluation only at step 0 and after the last step, both outside the timed steps.
        f"trainer.eval_every={w.total_steps + 1}",
        *(["hardware=gpu", f"hardware.device={w.device}"] if w.device.startswith("cuda") else ["hardware.device=cpu"]),
        f"hardware.num_threads={w.num_threads}", f"hardware.precision={w.precision}",
        *w.model_overrides,
    ]


def compose_train_config(overrides: list[str]) -> TrainConfig:
    """Compose `conf/train.yaml` with overrides, as `gspo train` does, into a typed config."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    return OmegaConf.to_object(cfg)


def workload_problems(cfg: TrainConfig) -> list[Problem]:
    """The training problems in the order the trainer draws them: `total_steps × prompts_per_step`.

    The project's trainer reads a `PromptStream` seeded with `cfg.seed`; replaying it here
    gives TRL the very same prompts.
    """
    task = build_task(cfg.task)
    stream = PromptStream(task.train, cfg.seed)
    return stream.next_batch(cfg.trainer.max_steps * cfg.trainer.prompts_per_step)
