"""Verifiable reward functions, registered by name.

Every reward is called as `REWARDS[name](completion, answer) -> float`, where `completion`
is the decoded response (without the end-of-sequence token) and `answer` the reference.
"""

from __future__ import annotations

from typing import Callable

RewardFn = Callable[[str, str], float]


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion equals the reference answer, ignoring surrounding whitespace."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
}
