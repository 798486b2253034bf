"""Supervised warm start: the local stand-in for a pretrained base model.

RL only learns from a model that sometimes succeeds. A real run starts from a pretrained
checkpoint; the tiny model the tool builds starts from random weights, so before RL it is
trained briefly with teacher forcing on the task's reference answers (for a task with worked
solutions, the whole solution), and stopped at the step whose greedy accuracy on a probe of
training problems it does not train on is nearest a target (40–75% is the useful range). The result is
cached on disk and reused by every later run with the same model, task and warm-start settings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gspo_cli.config import ModelConfig, TaskConfig, WarmStartConfig
from gspo_cli.data.tasks import Problem, Task, build_task
from gspo_cli.models.build import built_model_dir
from gspo_cli.models.loading import load_model, load_tokenizer
from gspo_cli.models.routing import MoERouting, is_moe, load_balance_metrics, pooled_load_balance_metrics
from gspo_cli.models.storage import config_hash, write_dir_atomically
from gspo_cli.rollout.evaluation import greedy_eval
from gspo_cli.rollout.scoring import positions_from_mask

PROBE_SIZE = 512  # training problems used to decide when to stop (accuracy ±2.2 points at 0.45)
# Part of the cache key: bump when the procedure changes, so cached warm starts are redone.
# 2: landing nearest the target, checked every step after the first crossing (issue 18).
# 3: a probe of 512 problems left out of training, a check within `tolerance` ends it (issue 18).
WARM_START_VERSION = 3
METADATA = "warm_start.json"  # in the cached directory: the summary below, its seconds and its settings


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


def probe_and_pool(train: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """(probe, pool): the problems whose greedy accuracy decides when to stop, and those the warm
    start trains on. With at least 4 × PROBE_SIZE problems the probe is left out of the pool, so
    its accuracy estimates held-out accuracy; trained on, it ran ahead of it (0.52 on the probe
    against 0.438 held out, issue 18). A smaller file trains on all of its problems."""
    probe = train[:PROBE_SIZE]
    return probe, train[PROBE_SIZE:] if len(train) >= 4 * PROBE_SIZE else train


def reference_tokens(tokenizer, problems: list[Problem]) -> int:
    """Tokens of the longest reference answer, end-of-sequence token included."""
    return max(len(ids) for ids in tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]) + 1


@dataclass
class Snapshot:
    """The warm start's whole state at one step: weights, AdamW's moments, the batch sampler."""

    step: int
    accuracy: float
    model: dict
    optimizer: dict
    rng: object

    @classmethod
    def take(cls, step: int, accuracy: float, model, optimizer, rng: random.Random) -> Snapshot:
        return cls(step, accuracy, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                   rng.getstate())

    def restore(self, model, optimizer, rng: random.Random) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        rng.setstate(self.rng)


def warm_start(model, tokenizer, task: Task, cfg, max_new_tokens: int, log: Callable[[str], None]) -> dict[str, float]:
    """Teacher-force `model` on training answers until the probe accuracy reaches the target,
    then land on the step whose probe accuracy is nearest the target.

    The probe is checked every `check_every` steps; a check within `tolerance` of the target ends
    the warm start there. When a check first passes the target, the state of the check before is
    restored and the same steps (same batches) are replayed with a check after every step; the
    run stops at the first step that comes within `tolerance` of the target or passes it, or at
    the step before if that one is nearer. So the landing is within one optimizer step of the
    target, not within `check_every` steps (a jump of up to ~15 points).
    The held-out accuracy of the result, the base RL starts from, is measured and logged.
    """
    rng = random.Random(cfg.seed)
    probe, pool = probe_and_pool(task.train)
    longest = reference_tokens(tokenizer, probe)
    if longest > max_new_tokens:
        raise ValueError(f"trainer.max_new_tokens={max_new_tokens} is shorter than the task's reference answers "
                         f"(up to {longest} tokens with the end-of-sequence token): greedy answers would be cut "
                         f"off and the warm start could never reach its target; set trainer.max_new_tokens>={longest}")
    # A small file (fewer training rows than a batch) is trained on whole, every step.
    batch_size = min(cfg.batch_size, len(pool))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()

    def train_step() -> float:
        ids, mask, labels = supervised_batch(tokenizer, rng.sample(pool, batch_size))
        loss = supervised_loss(model, ids, mask, labels, cfg.balance_coef, cfg.balance_scope)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def probe_accuracy() -> float:
        return greedy_eval(model, tokenizer, task, probe, max_new_tokens)[0]["eval/accuracy"]

    before = Snapshot.take(0, 0.0, model, optimizer, rng)  # the last check below the target
    accuracy, step = 0.0, 0
    for step in range(1, cfg.max_steps + 1):
        loss = train_step()
        if step % cfg.check_every and step != cfg.max_steps:
            continue
        accuracy = probe_accuracy()
        log(f"warm start step {step}: loss {loss:.3f}, probe accuracy {accuracy:.3f}")
        if abs(accuracy - cfg.target_accuracy) <= cfg.tolerance:  # here already: no crossing to wait for
            break
        if accuracy >= cfg.target_accuracy:
            step, accuracy = land(before, step, train_step, probe_accuracy, model, optimizer, rng,
                                  cfg.target_accuracy, cfg.tolerance, log)
            break
        before = Snapshot.take(step, accuracy, model, optimizer, rng)
    else:
        log(f"warm start: probe accuracy {accuracy:.3f} after warm_start.max_steps={cfg.max_steps} steps, "
            f"below the target {cfg.target_accuracy}")
    held_out = greedy_eval(model, tokenizer, task, task.eval, max_new_tokens)[0]["eval/accuracy"]
    log(f"warm start: landed at step {step}, probe accuracy {accuracy:.3f} (target {cfg.target_accuracy}), "
        f"held-out (base) accuracy {held_out:.3f}")
    summary = {"steps": step, "probe_accuracy": accuracy, "heldout_accuracy": held_out}
    if is_moe(model):
        balance = answer_load_balance(model, tokenizer, probe)
        log(f"warm start: expert load on the probe's answers: entropy {balance['routing/load_entropy']:.3f} of "
            f"log(num_experts), largest expert's share {balance['routing/max_load_share']:.3f} "
            f"(balance_coef {cfg.balance_coef})")
        summary.update(balance)
    return summary


BALANCE_SCOPES = ("pooled", "layer")


def supervised_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    balance_coef: float, balance_scope: str = "pooled") -> torch.Tensor:
    """The warm start's loss on one batch ([B, S] each): the cross-entropy of the labels, plus
    `balance_coef` × a load-balancing loss when `balance_coef` > 0: transformers' own
    `load_balancing_loss_func` over every layer's router logits together (`pooled`) or the same
    function on each layer's logits alone, mean over layers (`layer`); padding left out.

    `pooled` is transformers' sum (`Qwen3MoeForCausalLM.forward` adds `router_aux_loss_coef ×
    aux_loss` when asked for `output_router_logits`), with the coefficient set on the model. Under
    `layer` the model adds nothing (its coefficient 0 during the call) and the per-layer mean is
    added here. The config records the coefficient, so the saved warm start says what trained it."""
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=labels)
    if balance_coef <= 0:
        return model(**inputs).loss
    if balance_scope not in BALANCE_SCOPES:
        raise ValueError(f"model.warm_start.balance_scope={balance_scope!r}: expected one of {BALANCE_SCOPES}")
    if not hasattr(model, "router_aux_loss_coef"):
        raise ValueError(f"model.warm_start.balance_coef={balance_coef}: {type(model).__name__} has no "
                         "load-balancing loss (an MoE model such as Qwen3-MoE has); set it to 0")
    model.config.router_aux_loss_coef = balance_coef
    if balance_scope == "pooled":
        model.router_aux_loss_coef = balance_coef
        return model(**inputs, output_router_logits=True).loss
    model.router_aux_loss_coef = 0.0  # the forward's loss is then the cross-entropy alone
    out = model(**inputs, output_router_logits=True)
    balancing = load_balancing_loss_func(type(model))
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    per_layer = [balancing((logits,), num_experts, top_k, mask) for logits in out.router_logits]
    return out.loss + balance_coef * torch.stack(per_layer).mean()


def load_balancing_loss_func(model_class: type) -> Callable:
    """transformers' Switch Transformer balancing loss from the module that defines `model_class`
    (every MoE model family of transformers has its own copy, e.g. Qwen3-MoE's)."""
    module = sys.modules[model_class.__module__]
    if not hasattr(module, "load_balancing_loss_func"):
        raise ValueError(f"model.warm_start.balance_scope=layer: {model_class.__name__}'s module has no "
                         "load_balancing_loss_func; use balance_scope=pooled")
    return module.load_balancing_loss_func


@torch.no_grad()
def answer_load_balance(model, tokenizer, problems: list[Problem], batch_size: int = 64) -> dict[str, float]:
    """`load_balance_metrics` of the experts chosen on the tokens that predict the problems' reference
    answers (teacher-forced: the last prompt token to the one before the end token), the positions
    whose routes RL's `routing/load_entropy` counts in sampled responses."""
    routing = MoERouting(model)
    was_training = model.training
    model.eval()
    routes, masks, margins = [], [], []  # per batch: per layer [B·S, k]; [B·S]; [layers, counted tokens]
    try:
        for i in range(0, len(problems), batch_size):
            ids, mask, labels = supervised_batch(tokenizer, problems[i:i + batch_size])
            with routing.capture() as captured:
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                            output_router_logits=True)
            predicting = torch.zeros_like(mask)
            predicting[:, :-1] = labels[:, 1:] != -100  # position t predicts the label at t + 1
            routes.append(list(captured))
            masks.append(predicting.reshape(-1))
            counted = predicting.reshape(-1).bool()
            margins.append(torch.stack([topk_margin(logits[counted], routing.top_k) for logits in out.router_logits]))
    finally:
        routing.remove()
        model.train(was_training)
    # Batches differ in width: their tokens are laid end to end as one row, [1, tokens(, k)].
    joined = [torch.cat(layer)[None] for layer in zip(*routes)]
    metrics = load_balance_metrics(joined, torch.cat(masks)[None], routing.num_experts)
    metrics.update(pooled_load_balance_metrics(joined, torch.cat(masks)[None], routing.num_experts))
    metrics.update(margin_metrics(torch.cat(margins, dim=1)))
    return metrics


def margin_metrics(margins: torch.Tensor) -> dict[str, float]:
    """Median and 10th percentile of top-k margins (any shape), and `routing/near_tie_share`, the
    share below NEAR_TIE: the density of near-ties, so an update that moves a gap by δ ≪ NEAR_TIE
    flips about near_tie_share × δ / NEAR_TIE of the boundary choices."""
    margins = margins.float().flatten()
    return {"routing/topk_margin_median": margins.median().item(),
            "routing/topk_margin_p10": margins.quantile(0.1).item(),
            "routing/near_tie_share": (margins < NEAR_TIE).float().mean().item()}


NEAR_TIE = 0.01  # router logits: a top-k margin below this counts as a near-tie


def topk_margin(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """How far each token's routing is from a change of expert: the k-th largest router logit
    minus the (k+1)-th ([tokens, E] -> [tokens]). An update flips a choice only where it moves
    these two logits past each other, so the smaller the margins, the more routes one update
    changes (the volatility of the GSPO paper's §5.3)."""
    top = router_logits.float().topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def land(before: Snapshot, crossed_at: int, train_step: Callable[[], float], probe_accuracy: Callable[[], float],
         model, optimizer, rng: random.Random, target: float, tolerance: float,
         log: Callable[[str], None]) -> tuple[int, float]:
    """Replay from `before` one step at a time up to `crossed_at`; stop at the first step whose
    probe comes within `tolerance` of `target` or passes it, or go back one step if that one was
    nearer. Returns (step, accuracy)."""
    before.restore(model, optimizer, rng)
    last = before
    step, accuracy = before.step, before.accuracy
    for step in range(before.step + 1, crossed_at + 1):
        train_step()
        accuracy = probe_accuracy()
        if accuracy >= target - tolerance or step == crossed_at:
            break
        last = Snapshot.take(step, accuracy, model, optimizer, rng)
    if last.step > 0 and target - last.accuracy < accuracy - target:  # the step before is nearer
        last.restore(model, optimizer, rng)
        step, accuracy = last.step, last.accuracy
    log(f"warm start: landed at step {step} (checked every step since {before.step}): "
        f"probe accuracy {accuracy:.3f}")
    return step, accuracy


def earlier_stage(model_cfg: ModelConfig, task_cfg: TaskConfig,
                  max_new_tokens: int) -> tuple[ModelConfig, TaskConfig, int]:
    """The configuration of the warm start `model.warm_start.begin_from` names: the same model and
    warm-start settings on the task with those keys changed (and its own `max_new_tokens`)."""
    overrides = dict(model_cfg.warm_start.begin_from or {})
    earlier_tokens = int(overrides.pop("max_new_tokens", max_new_tokens))
    # A stage of a longer curriculum names its own first stage: {..., begin_from: {...}}.
    earlier_ws = dataclasses.replace(model_cfg.warm_start, begin_from=overrides.pop("begin_from", None))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TaskConfig)}
    if unknown:
        raise ValueError(f"model.warm_start.begin_from: {sorted(unknown)} are not task keys (or max_new_tokens)")
    return (dataclasses.replace(model_cfg, warm_start=earlier_ws), dataclasses.replace(task_cfg, **overrides),
            earlier_tokens)


def warm_start_key(base_name: str, ws: WarmStartConfig, task_cfg: TaskConfig, max_new_tokens: int) -> str:
    """The cache key of a warm start: every setting that changes the weights it lands on.
    `balance_coef` was added later: left out at 0, so warm starts cached before it stay valid;
    `balance_scope` likewise at `pooled` (and wherever the coefficient is 0, which makes it moot)."""
    settings = dataclasses.asdict(ws)
    if settings["balance_scope"] == "pooled" or settings["balance_coef"] == 0:
        del settings["balance_scope"]  # added after `balance_coef`: left out at its default, as that one at 0
    if settings["balance_coef"] == 0:
        del settings["balance_coef"]
    return config_hash(base_name, settings, task_cfg, max_new_tokens, WARM_START_VERSION)


def warm_started_dir(model_cfg: ModelConfig, task_cfg: TaskConfig, cache_dir: Path, max_new_tokens: int,
                     task: Task, log: Callable[[str], None] = print) -> Path:
    """The cached warm-started model directory for this configuration, trained on first use."""
    base = built_model_dir(model_cfg, cache_dir)
    if not model_cfg.warm_start.enabled:
        return base
    if model_cfg.warm_start.balance_scope not in BALANCE_SCOPES:  # before a cached key is looked up or trained
        raise ValueError(f"model.warm_start.balance_scope={model_cfg.warm_start.balance_scope!r}: "
                         f"expected one of {BALANCE_SCOPES}")
    key = warm_start_key(base.name, model_cfg.warm_start, task_cfg, max_new_tokens)
    target = cache_dir / "warmstart" / f"{model_cfg.name}-{task_cfg.name}-{key}"
    if (target / "config.json").exists():
        log(f"warm start: reusing {target}")
        return target
    start = base
    if model_cfg.warm_start.begin_from:
        earlier_model, earlier_task, earlier_tokens = earlier_stage(model_cfg, task_cfg, max_new_tokens)
        log(f"warm start: begins from the warm start with {dict(model_cfg.warm_start.begin_from)}")
        start = warm_started_dir(earlier_model, earlier_task, cache_dir, earlier_tokens, build_task(earlier_task), log)
    log(f"warm start: supervised phase on '{task.name}' reference answers (cached in {target})")
    torch.manual_seed(model_cfg.warm_start.seed)
    # transformers' own experts and RMSNorm code: the warm start stands in for a pretrained base,
    # cached by its config, so it must not move when this tool's faster kernels (other rounding) change.
    model, tokenizer = load_model(start, experts_implementation="default", fused_rms_norm=False), load_tokenizer(start)
    began = time.perf_counter()
    summary = warm_start(model, tokenizer, task, model_cfg.warm_start, max_new_tokens, log)
    log(f"warm start: done in {time.perf_counter() - began:.0f}s, {summary}")

    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["warm_start"] = dataclasses.asdict(model_cfg.warm_start)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")

    return write_dir_atomically(target, write)
