"""Supervised warm start: the local stand-in for a pretrained base model.

RL only learns from a model that sometimes succeeds. A real run starts from a pretrained
checkpoint; the tiny model the tool builds starts from random weights, so before RL it is
trained briefly with teacher forcing on the task's reference answers, and stopped as soon
as its greedy accuracy on a slice of the *training* problems reaches a target (40–75% is
the useful range). The result is cached on disk and reused by every later run with the
same model, task and warm-start settings.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from gspo_cli.config import ModelConfig, TaskConfig
from gspo_cli.data.tasks import Problem, Task
from gspo_cli.models.build import built_model_dir
from gspo_cli.models.loading import load_model, load_tokenizer
from gspo_cli.models.storage import config_hash, write_dir_atomically
from gspo_cli.rollout.evaluation import greedy_eval
from gspo_cli.rollout.scoring import positions_from_mask

PROBE_SIZE = 256  # training problems used to decide when to stop


def supervised_batch(tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and labels (-100 outside the answer) for teacher forcing.

    The target is the answer followed by the end-of-sequence token, so the model also
    learns to stop.
    """
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]
    rows = [(q, a + [tokenizer.eos_token_id]) for q, a in zip(prompts, answers)]
    width = max(len(q) + len(a) for q, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (q, a) in enumerate(rows):
        seq = torch.tensor(q + a)
        ids[i, width - len(seq):] = seq  # left padding, as in rollouts
        mask[i, width - len(seq):] = 1
        labels[i, width - len(a):] = torch.tensor(a)
    return ids, mask, labels


def warm_start(model, tokenizer, task: Task, cfg, max_new_tokens: int, log: Callable[[str], None]) -> dict[str, float]:
    """Teacher-force `model` on training answers until the probe accuracy reaches the target."""
    rng = random.Random(cfg.seed)
    probe = task.train[:PROBE_SIZE]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    accuracy, step = 0.0, 0
    for step in range(1, cfg.max_steps + 1):
        ids, mask, labels = supervised_batch(tokenizer, rng.sample(task.train, cfg.batch_size))
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.check_every == 0:
            accuracy = greedy_eval(model, tokenizer, task, probe, max_new_tokens)[0]["eval/accuracy"]
            log(f"warm start step {step}: loss {loss.item():.3f}, train-probe accuracy {accuracy:.2f}")
            if accuracy >= cfg.target_accuracy:
                break
    return {"steps": step, "probe_accuracy": accuracy}


def warm_started_dir(model_cfg: ModelConfig, task_cfg: TaskConfig, cache_dir: Path, max_new_tokens: int,
                     task: Task, log: Callable[[str], None] = print) -> Path:
    """The cached warm-started model directory for this configuration, trained on first use."""
    base = built_model_dir(model_cfg, cache_dir)
    if not model_cfg.warm_start.enabled:
        return base
    key = config_hash(base.name, model_cfg.warm_start, task_cfg, max_new_tokens)
    target = cache_dir / "warmstart" / f"{model_cfg.name}-{task_cfg.name}-{key}"
    if (target / "config.json").exists():
        log(f"warm start: reusing {target}")
        return target
    log(f"warm start: supervised phase on '{task.name}' reference answers (cached in {target})")
    torch.manual_seed(model_cfg.warm_start.seed)
    # transformers' own experts and RMSNorm code: the warm start stands in for a pretrained base,
    # cached by its config, so it must not move when this tool's faster kernels (other rounding) change.
    model, tokenizer = load_model(base, experts_implementation="default", fused_rms_norm=False), load_tokenizer(base)
    start = time.perf_counter()
    summary = warm_start(model, tokenizer, task, model_cfg.warm_start, max_new_tokens, log)
    log(f"warm start: done in {time.perf_counter() - start:.0f}s, {summary}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(target, write)
