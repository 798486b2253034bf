"""The workload through this project's trainer, via its public API (`gspo_cli.train.loop.train`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gspo_cli.config import TrainConfig
from gspo_cli.data.tasks import build_task
from gspo_cli.train.loop import resolve_model_path, train

# Phase timings the trainer logs every step (issue 9, item 1), in `metrics.jsonl`.
PHASES = ("generate_s", "reward_s", "old_logp_s", "update_s")


def prepare_model_dir(cfg: TrainConfig) -> Path:
    """Build (once, cached under `cfg.cache_dir`) the model directory both trainers start from."""
    return Path(resolve_model_path(cfg, build_task(cfg.task), log=lambda _: None))


def summarize_metrics(lines: list[dict[str, Any]], rollout_size: int, first: int = 0,
                      count: int | None = None) -> dict[str, Any]:
    """Add up `count` steps (all from there on if None) of a `metrics.jsonl`, from its step
    number `first` (0-based): seconds per phase, response tokens, completions.

    Records without `time/step_s` (the final evaluation) are not steps.
    Response tokens of a step are its `throughput/tokens_per_s × time/step_s`.
    """
    steps = [line for line in lines if "time/step_s" in line][first:None if count is None else first + count]
    return {
        "timed_s": sum(line["time/step_s"] for line in steps),
        "phases": {name: sum(line.get(f"time/{name}", 0.0) for line in steps) for name in PHASES},
        "response_tokens": round(sum(line["throughput/tokens_per_s"] * line["time/step_s"] for line in steps)),
        "completions": rollout_size * len(steps),
        "steps": len(steps),
    }


def run_project(cfg: TrainConfig, run_dir: Path, prompt_tokens: int, warmup_steps: int) -> dict[str, Any]:
    """Train with `gspo_cli.train.loop.train`; read the warm-up and the timed steps back from `metrics.jsonl`.

    `prompt_tokens` are those of the timed steps."""
    from importlib.metadata import version

    train(cfg, run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollout_size = cfg.trainer.prompts_per_step * cfg.trainer.group_size
    return {"framework": "gspo", "version": version("gspo-cli"), "prompt_tokens": prompt_tokens,
            **summarize_metrics(lines, rollout_size, first=warmup_steps),
            "warmup": summarize_metrics(lines, rollout_size, count=warmup_steps) if warmup_steps else None}
