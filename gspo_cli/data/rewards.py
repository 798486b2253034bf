"""Verifiable reward functions, registered by name, and their weighted composition.

Every reward is called as `REWARDS[name](completion, answer) -> float`, where `completion`
is the decoded response (without the end-of-sequence token) and `answer` the reference.
A reward that also needs the response length (the overlong penalty) declares keyword-only
`num_tokens` and `max_tokens`; `RewardScorer` passes them when it knows them.

Model output is only ever parsed, never evaluated: custom rewards come from import paths
the user wrote in the config.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from gspo_cli.algo.batch_shaping import overlong_penalty as batch_overlong_penalty

RewardFn = Callable[..., float]
log = logging.getLogger(__name__)


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion equals the reference answer, ignoring surrounding whitespace."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


# ---------------------------------------------------------------------------- final answers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: thousands groups ("1,000.5"), or digits with an optional decimal part or
# "/denominator"; a minus sign counts unless it follows a digit ("5-3" ends in "3").
_NUMBER = re.compile(r"(?<![\d)])-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?)")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), nested braces included.

    A trailing box whose braces never close (a truncated response) is no answer: returns None.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None


def after_hashes(text: str) -> Optional[str]:
    """The rest of the line after the last `####` (the GSM8K answer marker), or None."""
    if "####" not in text:
        return None
    found = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    return found or None


def final_answer(text: str) -> Optional[str]:
    """The final answer a response states: the last `\\boxed{}`, else `#### x`, else the last number.

    Once a response uses `\\boxed`, only a complete box counts (no fallback to stray numbers).
    """
    if _BOXED.search(text):
        return last_boxed(text)
    hashed = after_hashes(text)
    if hashed is not None:
        return hashed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalize(answer: str) -> str:
    """Strip what math-verify does not read but that never changes a value: `$`, `\\%`, `\\!`."""
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"\\?%$", "", answer)  # "50\%" and "50%" mean the reference "50"
    return answer.replace("\\!", "").strip().rstrip(".")


def _verifier_timeout() -> Optional[int]:
    """math-verify bounds sympy with SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers are mathematically equal (numbers, fractions, LaTeX, sets...).

    The comparison is math-verify's (sympy-based); both sides are parsed as the content of a
    `\\boxed{}`, so plain "1/2", "0.5" and "\\dfrac{1}{2}" all read as one half. Answers it
    cannot parse (words, say) fall back to comparing the normalised strings.
    """
    from math_verify import parse, verify  # imported lazily: it loads sympy (~0.5 s)

    predicted, reference = _normalize(predicted), _normalize(reference)
    if not predicted or not reference:
        return False
    timeout = _verifier_timeout()
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    target = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if gold and target and verify(gold, target, timeout_seconds=timeout):
        return True
    return _squash(predicted) == _squash(reference)


def _squash(answer: str) -> str:
    """Lower case without spaces or `\\text{}` wrappers, for answers that are words."""
    return re.sub(r"\\text\{([^{}]*)\}|\s+", r"\1", answer).lower()


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the reference mathematically.

    The reference may be a bare answer ("3/4") or a full solution whose answer is in
    `\\boxed{}` or after `####`; the completion's answer is taken by `final_answer`.
    """
    predicted = final_answer(completion)
    reference = last_boxed(answer) or after_hashes(answer) or answer
    return 1.0 if predicted is not None and math_equal(predicted, reference) else 0.0


_FINAL_LINE = re.compile(r"\n#### (-?\d+)\s*\Z")


def final_answer_match(completion: str, answer: str) -> float:
    """1.0 when the completion ends in the line `#### <integer>` and that integer is the reference's.

    The reference is a whole worked solution ending the same way (`task=arithmetic-chain`);
    only the final answers are compared, so a different route to the right answer scores 1.
    A completion with no such final line (malformed, or cut off at `max_new_tokens`) scores 0.
    """
    predicted, reference = _FINAL_LINE.search("\n" + completion), _FINAL_LINE.search("\n" + answer)
    if reference is None:
        raise ValueError(f"final_answer_match: the reference does not end in a '#### <integer>' line: {answer[-80:]!r}")
    return 1.0 if predicted is not None and int(predicted.group(1)) == int(reference.group(1)) else 0.0


# ---------------------------------------------------------------------------- format and length


def format_reward(completion: str, answer: str, *, pattern: Optional[str] = None) -> float:
    """1.0 when the completion states its answer in the required format, else 0.0.

    Args:
        pattern: a regular expression the whole completion must match (dot matches newline),
            e.g. `<think>.*</think>\\s*<answer>.*</answer>`; by default a complete
            `\\boxed{...}` or a `#### <answer>` line is required.
    """
    if pattern is not None:
        return 1.0 if re.fullmatch(pattern, completion.strip(), re.DOTALL) else 0.0
    return 1.0 if last_boxed(completion) or after_hashes(completion) else 0.0


def overlong_penalty(completion: str, answer: str, *, num_tokens: int, max_tokens: int,
                     buffer_tokens: Optional[int] = None) -> float:
    """DAPO's soft overlong punishment (Yu et al., 2025, §3.4, Eq. 13) as a reward term, in [-1, 0].

    The default buffer is 20% of L_max = `max_tokens`, DAPO's 4,096 of 20,480 tokens; the
    formula is `algo.batch_shaping.overlong_penalty`, which `algo.overlong_buffer` also uses.
    """
    buffer = buffer_tokens if buffer_tokens is not None else max(1, round(0.2 * max_tokens))
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong buffer_tokens={buffer} must be in [1, max_tokens={max_tokens}]")
    return batch_overlong_penalty(torch.tensor([num_tokens]), max_tokens, buffer).item()


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "final_answer_match": final_answer_match,
    "math": math_reward,
    "format": format_reward,
    "overlong": overlong_penalty,
}


# ---------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class RewardTerm:
    """One weighted component of a task's reward."""

    name: str
    fn: RewardFn
    weight: float = 1.0

    @property
    def uses_length(self) -> bool:
        """Whether the function takes the response length (`num_tokens`, `max_tokens`)."""
        return "num_tokens" in inspect.signature(self.fn).parameters


def import_reward(path: str) -> RewardFn:
    """The callable at `pkg.module.fn`, imported as written in the config (nothing else is run)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"task.reward _target_={path!r} is not an import path like 'mypkg.rewards.fn'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"task.reward _target_={path!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"task.reward _target_={path!r} is not callable")
    return fn


def _term(name: str, spec: Mapping[str, Any]) -> RewardTerm:
    """A term from `{weight: w, _target_: path, **kwargs}`; without `_target_`, `name` is registered."""
    options = dict(spec)
    weight = float(options.pop("weight", 1.0))
    target = options.pop("_target_", None)
    if target is not None:
        fn = import_reward(str(target))
    elif name in REWARDS:
        fn = REWARDS[name]
    else:
        raise ValueError(f"task.reward: {name!r} is not one of {sorted(REWARDS)} (or give it a _target_)")
    if options:
        try:  # bind now, so a misspelled option fails before training starts
            inspect.signature(fn).bind_partial("completion", "answer", **options)
        except TypeError as err:
            raise ValueError(f"task.reward {name!r}: bad options {sorted(options)}: {err}") from err
        fn = functools.partial(fn, **options)
    return RewardTerm(name, fn, weight)


def reward_terms(spec: Any) -> list[RewardTerm]:
    """Read `task.reward`: a registered name, `{_target_: path, ...}`, or `{name: weight | {...}}`.

    Examples: `math`; `{_target_: mypkg.rewards.fn}`; `{math: 1.0, format: 0.1,
    overlong: {weight: 1.0, buffer_tokens: 64}, mine: {_target_: mypkg.rewards.fn, weight: 0.5}}`.
    """
    if isinstance(spec, str):
        return [_term(spec, {})]
    if isinstance(spec, Mapping) and "_target_" in spec:
        return [_term(str(spec["_target_"]).rpartition(".")[2], spec)]
    if isinstance(spec, Mapping) and spec:
        return [_term(str(name), value if isinstance(value, Mapping) else {"weight": value})
                for name, value in spec.items()]
    raise ValueError(f"task.reward={spec!r}: give a name in {sorted(REWARDS)}, "
                     "{_target_: pkg.mod.fn}, or {name: weight, ...}")


class RewardScorer:
    """Scores completions with a weighted sum of reward terms, one term failing at a time.

    A term that raises (or returns a non-finite value) on a sample scores 0 there, the
    failure is counted in `reward/errors`, and the first failure is logged in full once:
    one bad sample from a user's function must not end a long run.
    """

    def __init__(self, terms: list[RewardTerm]) -> None:
        self.terms = terms
        self.error_logged = False

    def _call(self, term: RewardTerm, completion: str, answer: str, context: dict[str, int]) -> tuple[float, bool]:
        try:
            value = float(term.fn(completion, answer, **context))
            if not math.isfinite(value):
                raise ValueError(f"reward {term.name!r} returned {value}")
            return value, False
        except Exception:  # noqa: BLE001 - any failure of a reward function scores 0, see class doc
            if not self.error_logged:
                self.error_logged = True
                log.exception("reward %r failed on a sample; it scores 0 there, and later failures are only "
                              "counted in reward/errors.\ncompletion: %r\nanswer: %r", term.name, completion, answer)
            return 0.0, True

    def score(self, completions: list[str], answers: list[str], num_tokens: Optional[list[int]] = None,
              max_tokens: Optional[int] = None) -> tuple[list[float], dict[str, float]]:
        """Total rewards of N completions and the metrics `reward/<name>/mean`, `reward/errors`.

        Args:
            completions, answers: N decoded responses and their references.
            num_tokens: N response lengths in tokens; terms that need it are skipped without it.
            max_tokens: the response length limit (`trainer.max_new_tokens`).
        """
        totals = [0.0] * len(completions)
        metrics: dict[str, float] = {}
        errors = 0
        for term in self.terms:
            uses_length = term.uses_length
            if uses_length and (num_tokens is None or max_tokens is None):
                continue
            values = []
            for i, (completion, answer) in enumerate(zip(completions, answers)):
                context = {"num_tokens": int(num_tokens[i]), "max_tokens": max_tokens} if uses_length else {}
                value, failed = self._call(term, completion, answer, context)
                values.append(value)
                errors += failed
                totals[i] += term.weight * value
            metrics[f"reward/{term.name}/mean"] = sum(values) / max(len(values), 1)
        metrics["reward/errors"] = float(errors)
        return totals, metrics
