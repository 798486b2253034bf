"""The `gspo eval` job: greedy accuracy, mean@k, unbiased pass@k and maj@k of checkpoints on
held-out problems.

The greedy pass is the training loop's own (`rollout.evaluation.greedy_eval`); this job adds
k sampled responses per problem and scores any Hugging Face causal-LM directory the same way.
The task a checkpoint is scored on (a `gspo train` run's own, by default) is decided in `eval_task`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gspo_cli.config import EvalConfig
from gspo_cli.data.rewards import final_answer
from gspo_cli.data.tasks import Problem, Task
from gspo_cli.eval_task import EvalSettings, describe, given_keys, read_run_settings, settings_for
from gspo_cli.report.eval_records import problems_digest
from gspo_cli.report.stats import wilson_interval
from gspo_cli.rollout.engines import sample_rollout
from gspo_cli.rollout.evaluation import greedy_eval

# ---------------------------------------------------------------------------- k-sample metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k).

    The chance that k samples drawn without replacement from the n contain a correct one
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1). Exact
    integer binomials: no overflow or cancellation for the sizes used here.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def vote_key(completion: str) -> str:
    """What a response votes for: its final answer (`\\boxed{}`, `####`, last number), else its text."""
    answer = final_answer(completion)
    return (answer if answer is not None else completion).strip()


def maj_at_k(answers: Sequence[str], correct: Sequence[bool]) -> float:
    """Majority vote over k answers: 1 if the most frequent answer is correct, else 0.

    Answers are compared after stripping whitespace. The winning answer scores the share of
    its votes that were rewarded as correct (1 or 0 whenever the reward depends only on the
    answer). A tie between several most frequent answers scores the mean over them, i.e. the
    expected score of a uniform random tie-break, so the result does not depend on sample order.

    Args:
        answers: The k vote keys of one problem (see `vote_key`).
        correct: Whether each of the k responses was correct.
    """
    if not answers or len(answers) != len(correct):
        raise ValueError("maj@k needs one correctness flag per answer, and at least one answer")
    votes: dict[str, list[bool]] = {}
    for answer, ok in zip(answers, correct):
        votes.setdefault(answer.strip(), []).append(bool(ok))
    top = max(len(v) for v in votes.values())
    winners = [v for v in votes.values() if len(v) == top]
    return sum(sum(v) / len(v) for v in winners) / len(winners)


def k_sample_metrics(correct: torch.Tensor, answers: list[list[str]], k: int) -> dict[str, float]:
    """mean@k, pass@k and maj@k averaged over problems.

    Args:
        correct: [P, n] bool, sample j of problem i is correct; n ≥ k.
        answers: P lists of the n vote keys (`vote_key` of each response).
        k: Samples per problem the metrics are about.

    Returns:
        `eval/mean@k` (accuracy of one sample, estimated from all n), `eval/pass@k`
        (unbiased, from all n) and `eval/maj@k` (vote over the first k samples).
    """
    P, n = correct.shape
    counts = correct.sum(1).tolist()
    return {
        f"eval/mean@{k}": correct.float().mean().item(),
        f"eval/pass@{k}": sum(pass_at_k(n, c, k) for c in counts) / P,
        f"eval/maj@{k}": sum(maj_at_k(a[:k], row[:k].tolist()) for a, row in zip(answers, correct)) / P,
    }


@torch.no_grad()
def sampled_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    n: int,
    k: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    batch_size: int = 512,
    stop_strings: Sequence[str] = (),
    engine: str = "builtin",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample n responses per problem (ending at the model's stop tokens and `stop_strings`, drawn
    by the rollout `engine`) and compute the k-sample metrics.

    Returns:
        (metrics, samples): `k_sample_metrics` plus `eval/sample_response_length` (mean
        tokens of a sampled response, end-of-sequence included); one dict per response.
    """
    model.eval()
    per_batch = max(1, batch_size // n)  # whole problems per forward batch
    correct, answers, lengths, samples = [], [], [], []
    for start in range(0, len(problems), per_batch):
        chunk = problems[start:start + per_batch]
        prompts = [p.prompt for p in chunk for _ in range(n)]  # the n samples of a problem contiguous
        rollout = sample_rollout(engine, model, tokenizer, prompts, max_new_tokens, temperature, generator,
                                 stop_strings=stop_strings)
        lengths.extend(rollout.response_mask.sum(1).tolist())
        for i, problem in enumerate(chunk):
            completions = rollout.completions[i * n:(i + 1) * n]
            rewards = [task.reward(c, problem.answer) for c in completions]
            correct.append([r >= 1.0 for r in rewards])
            answers.append([vote_key(c) for c in completions])
            samples.extend({"prompt": problem.prompt, "completion": c, "answer": problem.answer, "reward": r}
                           for c, r in zip(completions, rewards))
    metrics = k_sample_metrics(torch.tensor(correct), answers, k)
    metrics["eval/sample_response_length"] = sum(lengths) / max(len(lengths), 1)
    return metrics, samples


# ---------------------------------------------------------------------------- the `gspo eval` job


def checkpoint_list(checkpoint: Any) -> list[str]:
    """`checkpoint=a` or `checkpoint=[a,b]` as a list of strings."""
    if checkpoint is None or checkpoint == "???":
        raise ValueError("set checkpoint=<dir> (a model directory, a `gspo train` run directory, or [a,b])")
    items = list(checkpoint) if isinstance(checkpoint, (list, tuple)) or OmegaConf.is_list(checkpoint) else [checkpoint]
    return [str(c) for c in items]


def resolve_checkpoint(path: str) -> str:
    """A `gspo train` run directory stands for its final model (a whole model, or LoRA adapters that
    `load_model` merges into their base), a resumable `checkpoints/step_N/` for its `model/`;
    anything else is loaded as given."""
    for model in (Path(path) / "checkpoints" / "final", Path(path) / "model"):
        if (model / "config.json").exists() or (model / "adapter_config.json").exists():
            return str(model)
    return path


def checkpoint_label(path: str) -> str:
    """A short name: `<algo>-s<seed>` for a `gspo train` run directory, else the last path part."""
    config = Path(path) / ".hydra" / "config.yaml"
    if config.exists():
        cfg = OmegaConf.load(config)
        return f"{cfg.algo.name}-s{cfg.seed}"
    return Path(path).name or path


def evaluate_checkpoint(path: str, cfg: EvalConfig, task: Task, settings: EvalSettings
                        ) -> tuple[dict[str, float], list[dict[str, Any]], tuple[str, list[int]]]:
    """Load one causal LM and score it on the task's held-out split: greedy, then n samples, each
    response at most `settings.max_new_tokens` long and ended by `settings.stop_strings`.

    Returns:
        (metrics, the greedy samples logged, (digest of the problems as prompted, 1 per problem
        the greedy response answered correctly, else 0): what `eval_correct.jsonl` records).
    """
    from gspo_cli.models.loading import load_model, load_tokenizer

    ec = cfg.eval
    n = ec.n or ec.k
    if n < ec.k:
        raise ValueError(f"eval.n={n} must be at least eval.k={ec.k}")
    model_dir = resolve_checkpoint(path)
    model = load_model(model_dir, ec.dtype, cfg.hardware.device, ec.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, ec.trust_remote_code)
    task = task.for_tokenizer(tokenizer)  # the chat template, when task.chat_template is set
    length, stops = settings.max_new_tokens, settings.stop_strings
    metrics, greedy_samples = greedy_eval(model, tokenizer, task, task.eval, length, ec.batch_size, stops,
                                          engine=ec.rollout_engine)
    correct = (problems_digest(task.eval), [int(s["reward"] >= 1.0) for s in greedy_samples])
    generator = torch.Generator(device=cfg.hardware.device).manual_seed(cfg.seed)
    sampled, samples = sampled_eval(model, tokenizer, task, task.eval, n, ec.k, length, ec.temperature,
                                    generator, ec.batch_size, stops, ec.rollout_engine)
    return {**metrics, **sampled}, greedy_samples[:ec.samples_logged], correct


def comparison_table(results: list[dict[str, Any]], k: int):
    """A rich table: one row per checkpoint, one column per metric."""
    from rich.table import Table

    columns = ["eval/accuracy", f"eval/mean@{k}", f"eval/pass@{k}", f"eval/maj@{k}",
               "eval/response_length", "eval/sample_response_length"]
    table = Table(title=f"held-out evaluation (k = {k}); accuracy's 95% Wilson interval over the problems")
    table.add_column("checkpoint", overflow="fold")
    for name in columns:
        table.add_column(name.removeprefix("eval/").replace("_", " "), justify="right")
        if name == "eval/accuracy":
            table.add_column("95% CI", justify="right")
    for result in results:  # the short label; eval.json keeps the full path
        low, high = result.get("accuracy_ci") or (None, None)
        cells = [f"{result['metrics'][c]:.3f}" for c in columns]
        table.add_row(result["label"], cells[0], "–" if low is None else f"[{low:.3f}, {high:.3f}]", *cells[1:])
    return table


def run_eval(cfg: EvalConfig, run_dir: Path, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Evaluate every checkpoint; write `eval.json` and one W&B run (job_type=eval) per checkpoint.

    Args:
        overrides: The command line's Hydra overrides: what they set wins over a run's own
            task, response length and stop strings (`eval_task.settings_for`).
    """
    from rich.console import Console

    from gspo_cli.data.tasks import build_task
    from gspo_cli.report.logs import RunLogger
    from gspo_cli.train.host import configure_host

    paths = checkpoint_list(cfg.checkpoint)
    all_settings = settings_for(paths, cfg, given_keys(overrides), [read_run_settings(p) for p in paths])
    for path, settings in zip(paths, all_settings):  # before any loading: the user sees what is scored
        print(describe(path, settings))
    settings = all_settings[0]  # `settings_for` has refused checkpoints on different settings
    configure_host(cfg.hardware.num_threads, cfg.hardware.keep_freed_memory, cfg.hardware.device,
                   settings.max_new_tokens)
    task = build_task(settings.task_config())
    plain_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    plain_cfg["task"] = settings.task
    plain_cfg["eval"].update(max_new_tokens=settings.max_new_tokens, stop_strings=settings.stop_strings)
    results = []
    for i, (path, own) in enumerate(zip(paths, all_settings)):
        label = checkpoint_label(path)
        with RunLogger(run_dir / f"{i}-{label}", cfg.logger, {**plain_cfg, "checkpoint": path}, f"eval-{label}",
                       total_steps=0, key_metrics=("eval/accuracy", f"eval/pass@{cfg.eval.k}"),
                       job_type="eval") as logger:
            metrics, samples, (digest, correct) = evaluate_checkpoint(path, cfg, task, settings)
            logger.log(metrics, step=0)
            logger.log_samples(0, samples)
            logger.log_eval_correct(0, digest, correct)  # which problems: <i>-<label>/eval_correct.jsonl
        ci = wilson_interval(sum(correct), len(correct)) if correct else None
        results.append({"checkpoint": path, "label": label, "settings_from": own.origins, "metrics": metrics,
                        "accuracy_ci": None if ci is None else [ci.low, ci.high], "num_correct": sum(correct)})
    out = {"task": plain_cfg["task"], "eval": plain_cfg["eval"], "seed": cfg.seed,
           "num_problems": len(task.eval), "results": results}
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    console = Console() if Console().is_terminal else Console(width=120)  # logs are not 80 columns wide
    console.print(comparison_table(results, cfg.eval.k))
    print(f"wrote {run_dir / 'eval.json'}")
    return results
