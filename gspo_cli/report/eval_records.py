"""Which held-out problems each evaluation answered correctly: `eval_correct.jsonl` in the run directory.

One JSON line per evaluation, `{"step": 10, "problems": "<digest>", "correct": [1, 0, ...]}`:
`correct[i]` is 1 when the greedy response to held-out problem i (the task's `eval` order)
earned reward 1, else 0; `problems` is a digest of the problems (prompt and answer, in order),
so a report pairs two runs problem by problem only when they were evaluated on the same
problems. Written by rank 0 with every rank's share gathered (`train.steps.gather_correct`),
by the training loop and by `gspo eval`; read by `gspo report` for intervals and paired tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

EVAL_CORRECT_FILE = "eval_correct.jsonl"


@dataclass(frozen=True)
class EvalCorrect:
    """One evaluation's per-problem outcomes."""

    step: int
    problems: str
    """Digest of the held-out problems, in order (`problems_digest`)."""
    correct: tuple[int, ...]
    """1 per problem answered correctly, else 0, in the problems' order."""

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else float("nan")


def problems_digest(problems: Iterable[Any]) -> str:
    """A short digest (16 hex digits of SHA-256) of problems' prompts and answers, in order."""
    h = hashlib.sha256()
    for p in problems:
        for text in (p.prompt, p.answer):
            data = str(text).encode()
            h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two lists collide by joining
    return h.hexdigest()[:16]


def eval_correct_line(step: int, problems: str, correct: Iterable[bool | int]) -> str:
    """The JSON line of one evaluation (newline included)."""
    return json.dumps({"step": int(step), "problems": problems, "correct": [int(bool(c)) for c in correct]}) + "\n"


def read_eval_correct(run_dir: str | Path) -> dict[int, EvalCorrect]:
    """The evaluations of a run's `eval_correct.jsonl` by step ({} when the run has none).

    A last line cut short (a job killed while writing it) is dropped; a later line of the same
    step (a resumed run evaluating again) replaces an earlier one.
    """
    path = Path(run_dir) / EVAL_CORRECT_FILE
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record: {line[:80]!r}") from None
            continue
        out[int(record["step"])] = EvalCorrect(int(record["step"]), str(record["problems"]),
                                               tuple(int(c) for c in record["correct"]))
    return out
