"""Greedy evaluation on held-out problems: what the training loop logs as `eval/*`, what the
warm start stops on, and the greedy half of `gspo eval`."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gspo_cli.data.tasks import Problem, Task
from gspo_cli.rollout.engines import sample_rollout


@torch.no_grad()
def greedy_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    problems: list[Problem],
    max_new_tokens: int,
    batch_size: int = 256,
    stop_strings: Sequence[str] = (),
    still_running: Callable[[bool], bool] = bool,
    engine: str = "builtin",
    engine_options: Optional[dict] = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy-decode every problem once (ending at the model's stop tokens and `stop_strings`)
    and score it. `still_running` as in `generate_rollout` (ranks of a sharded model decode
    in lockstep); `engine` the rollout engine (`rollout/engines.py`).

    Returns:
        (metrics, samples): `eval/accuracy` (share of rewards equal to 1), `eval/reward`
        (mean reward) and `eval/response_length`; one sample dict per problem (with its
        `response_length` in tokens).
    """
    was_training = model.training
    model.eval()
    rewards, lengths, samples = [], [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rollout = sample_rollout(engine, model, tokenizer, [p.prompt for p in chunk], max_new_tokens, temperature=0.0,
                                 still_running=still_running, stop_strings=stop_strings, engine_options=engine_options)
        chunk_lengths = rollout.response_mask.sum(1).tolist()
        lengths.extend(chunk_lengths)
        for problem, completion, length in zip(chunk, rollout.completions, chunk_lengths):
            reward = task.reward(completion, problem.answer)
            rewards.append(reward)
            samples.append({"prompt": problem.prompt, "completion": completion,
                            "answer": problem.answer, "reward": reward, "response_length": length})
    model.train(was_training)
    n = max(len(rewards), 1)
    metrics = {
        "eval/accuracy": sum(r >= 1.0 for r in rewards) / n,
        "eval/reward": sum(rewards) / n,
        "eval/response_length": sum(lengths) / n,
    }
    return metrics, samples
