"""Tasks: prompt sets with reference answers, a held-out split, and the reward wiring."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from gspo_cli.config import TaskConfig
from gspo_cli.rewards import REWARDS


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer."""

    prompt: str
    answer: str


@dataclass
class Task:
    """A task: the training problems, the held-out problems, and the reward."""

    name: str
    train: list[Problem]
    eval: list[Problem]
    reward_fn: Callable[[str, str], float]

    def reward(self, completion: str, answer: str) -> float:
        """Score one completion against its reference answer."""
        return float(self.reward_fn(completion, answer))


OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def arithmetic_problems(max_operand: int, operators: str) -> list[Problem]:
    """Every `a <op> b` with operands in [0, max_operand], e.g. Problem("12+34=", "46")."""
    unknown = set(operators) - set(OPERATIONS)
    if unknown or not operators:
        raise ValueError(f"task.operators={operators!r}: choose from {''.join(OPERATIONS)}")
    return [
        Problem(f"{a}{op}{b}=", str(OPERATIONS[op](a, b)))
        for op in operators
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def split_heldout(problems: list[Problem], num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Deterministic shuffle, then the first `num_eval` problems are held out: (train, eval)."""
    if not 0 < num_eval < len(problems):
        raise ValueError(f"task.num_eval={num_eval} must be between 1 and {len(problems) - 1}")
    shuffled = list(problems)
    random.Random(seed).shuffle(shuffled)
    return shuffled[num_eval:], shuffled[:num_eval]


def build_task(cfg: TaskConfig) -> Task:
    """Build the task named in the config."""
    if cfg.reward not in REWARDS:
        raise ValueError(f"task.reward={cfg.reward!r} is not one of {sorted(REWARDS)}")
    if cfg.name != "arithmetic":
        raise ValueError(f"task.name={cfg.name!r}: the only built-in task is 'arithmetic'")
    train, held_out = split_heldout(arithmetic_problems(cfg.max_operand, cfg.operators), cfg.num_eval, cfg.seed)
    return Task(name=cfg.name, train=train, eval=held_out, reward_fn=REWARDS[cfg.reward])


class PromptStream:
    """Endless, seeded stream of training problems: reshuffled every epoch, never repeating within one.

    Its position (`epoch`, `index`) is all the state needed to continue the stream exactly.
    """

    def __init__(self, problems: list[Problem], seed: int) -> None:
        self.problems = problems
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Problem]:
        """The next `n` problems."""
        batch = []
        while len(batch) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.problems[self._order[self.index]])
            self.index += 1
        return batch
