"""Reward functions on hand-written cases, their composition, and failures that must not end a run."""

import logging
import math

import pytest

from gspo_cli.data.rewards import (
    REWARDS,
    RewardScorer,
    RewardTerm,
    exact_match,
    final_answer,
    format_reward,
    last_boxed,
    math_reward,
    overlong_penalty,
    reward_terms,
)

GSM8K_SOLUTION = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"

# (completion, reference answer, expected math reward)
MATH_CASES = [
    # equivalent forms of the same number
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so the total is 1,000", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{18.00}", "18", 1.0),
    ("\\boxed{1,000,000}", "10^6", 1.0),
    ("The answer is 1,234.5 dollars", "1234.5", 1.0),
    ("the answer is 3/4", "0.75", 1.0),  # a trailing fraction
    ("\\boxed{2.5}", "\\boxed{\\frac{5}{2}}", 1.0),
    # GSM8K markers and trailing numbers
    ("#### 72", "72", 1.0),
    ("She earns 9 + 3 = 12 dollars.\n#### 12", "12", 1.0),
    ("She has 5 apples, then 7 apples.", "7", 1.0),  # the last number is the answer
    ("She has 5 apples, then 7 apples.", "5", 0.0),
    ("The temperature drops to -3", "-3", 1.0),
    ("After 10-3 we get", "-3", 0.0),  # the minus of "10-3" is subtraction: the answer read is 3
    ("10-3=7", "7", 1.0),
    # references given as whole solutions
    ("\\boxed{72}", GSM8K_SOLUTION, 1.0),
    ("\\boxed{7}", GSM8K_SOLUTION, 0.0),
    ("So $x = \\boxed{\\frac{5}{2}}$.", "Hence x = \\boxed{\\frac{5}{2}}.", 1.0),
    # nested braces, simple LaTeX and algebra
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\frac{\\frac{1}{2}}{3}}", "\\frac{1}{6}", 1.0),
    ("\\boxed{x^{2}+1}", "1+x^2", 1.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\boxed{\\infty}", "\\infty", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),  # sets are unordered
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1.0),
    ("\\boxed{x=2}", "2", 1.0),  # an equation's value
    ("\\fbox{7}", "7", 1.0),
    # decorations that do not change the value
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{\\text{Monday}}", "Monday", 1.0),  # words compare as normalised text
    # the last box counts
    ("First \\boxed{5}, no wait, \\boxed{6}", "6", 1.0),
    ("First \\boxed{5}, no wait, \\boxed{6}", "5", 0.0),
    # wrong answers
    ("\\boxed{3}", "4", 0.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{2x+1}", "2x-1", 0.0),
    ("\\boxed{(1,2)}", "(2,1)", 0.0),  # ordered pairs (intervals) are not sets
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),  # not equal, only close
    ("\\boxed{3.14}", "\\pi", 0.0),
    ("\\boxed{10}", "10.5", 0.0),
    ("\\boxed{\\frac{a}{b}}", "\\frac{b}{a}", 0.0),
    ("\\boxed{Tuesday}", "Monday", 0.0),
    # missing answers
    ("I don't know.", "4", 0.0),
    ("", "4", 0.0),
    ("\\boxed{}", "4", 0.0),
    ("\\boxed{12", "12", 0.0),  # a truncated box is no answer, and stray numbers do not count
]


def test_the_math_table_is_large_enough():
    assert len(MATH_CASES) >= 40


@pytest.mark.parametrize("completion,answer,expected", MATH_CASES)
def test_math_reward(completion, answer, expected):
    assert REWARDS["math"](completion, answer) == expected


def test_final_answer_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"  # last box, nested braces
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # never closed
    assert final_answer("12 then \\boxed{3}") == "3"
    assert final_answer("work\n#### 1,234\n") == "1,234"
    assert final_answer("costs $5.50.") == "5.50"  # the sentence's full stop is not a decimal point
    assert final_answer("no digits") is None


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" 46\n", "46") == 1.0
    assert exact_match("4 6", "46") == 0.0
    assert math_reward("46", "46") == 1.0


def test_format_reward():
    assert format_reward("so \\boxed{3}", "3") == 1.0
    assert format_reward("work\n#### 3", "3") == 1.0
    assert format_reward("the answer is 3", "3") == 0.0  # right, but not in the required format
    assert format_reward("\\boxed{3", "3") == 0.0
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    assert format_reward("<think>a\nb</think> <answer>3</answer>", "3", pattern=pattern) == 1.0
    assert format_reward("<answer>3</answer>", "3", pattern=pattern) == 0.0


def test_overlong_penalty_follows_dapo():
    # L_max = 20, L_cache = 5: free up to 15 tokens, then -(|y| - 15) / 5, and -1 past 20.
    values = [overlong_penalty("", "", num_tokens=n, max_tokens=20, buffer_tokens=5) for n in (10, 15, 16, 18, 20, 21)]
    assert values == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0])
    # Default buffer: 20% of L_max (DAPO's 4,096 of 20,480) = 2 of 10, so 9 tokens cost -0.5.
    assert overlong_penalty("", "", num_tokens=9, max_tokens=10) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="buffer_tokens"):
        overlong_penalty("", "", num_tokens=9, max_tokens=10, buffer_tokens=11)


def test_weighted_components_sum_and_are_logged_one_by_one():
    scorer = RewardScorer(reward_terms({"math": 1.0, "format": 0.5, "overlong": {"buffer_tokens": 2}}))
    completions = ["\\boxed{4}", "4", "\\boxed{5}"]
    rewards, metrics = scorer.score(completions, ["4", "4", "4"], num_tokens=[2, 3, 4], max_tokens=4)
    # math 1, 1, 0; format 1, 0, 1 (x0.5); overlong (L_max 4, buffer 2): 0, -0.5, -1.
    assert rewards == pytest.approx([1.5, 0.5, -0.5])
    assert metrics["reward/math/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/format/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/overlong/mean"] == pytest.approx(-0.5)
    assert metrics["reward/errors"] == 0
    # Without lengths (as in `Task.reward`), the length term is left out, not failed.
    rewards, metrics = scorer.score(completions, ["4", "4", "4"])
    assert rewards == pytest.approx([1.5, 1.0, 0.5]) and "reward/overlong/mean" not in metrics


def test_a_failing_reward_scores_zero_counts_and_is_shown_once(caplog):
    def picky(completion: str, answer: str) -> float:
        if completion == "boom":
            raise RuntimeError("cannot score 'boom'")
        return 1.0

    def not_a_number(completion: str, answer: str) -> float:
        return math.nan

    scorer = RewardScorer(reward_terms("exact_match") + [RewardTerm("picky", picky, 2.0)])
    with caplog.at_level(logging.ERROR, logger="gspo_cli.data.rewards"):
        rewards, metrics = scorer.score(["boom", "x", "boom"], ["x", "x", "x"])
        scorer.score(["boom"], ["x"])
    # exact_match 0, 1, 0 plus 2 x picky (0 where it raised, 1 elsewhere).
    assert rewards == [0.0, 3.0, 0.0]
    assert metrics["reward/errors"] == 2 and metrics["reward/picky/mean"] == pytest.approx(1 / 3)
    failures = [r for r in caplog.records if "failed on a sample" in r.getMessage()]
    assert len(failures) == 1 and "cannot score 'boom'" in caplog.text  # the first one, with its traceback
    nan_scorer = RewardScorer(reward_terms("exact_match") + [RewardTerm("nan", not_a_number)])
    assert nan_scorer.score(["x"], ["x"])[1]["reward/errors"] == 1  # a NaN reward would poison the advantages


def test_custom_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_match(completion, answer, scale=1.0):\n"
        "    return scale * float(len(completion) == len(answer))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (term,) = reward_terms({"_target_": "my_rewards_mod.length_match", "scale": 3.0})
    assert term.name == "length_match"
    assert RewardScorer([term]).score(["abc", "ab"], ["xyz", "xyz"])[0] == [3.0, 0.0]
    (a, b) = reward_terms({"exact_match": 1.0, "mine": {"_target_": "my_rewards_mod.length_match", "weight": 0.5}})
    assert (a.name, a.weight, b.name, b.weight) == ("exact_match", 1.0, "mine", 0.5)


def test_bad_reward_specs_fail_before_training_with_the_choices():
    with pytest.raises(ValueError, match="exact_match"):
        reward_terms("exact-match")
    with pytest.raises(ValueError, match="cannot be imported"):
        reward_terms({"_target_": "no_such_module_here.fn"})
    with pytest.raises(ValueError, match="bad options"):
        reward_terms({"format": {"patern": "x"}})  # misspelled option of `format_reward`
    with pytest.raises(ValueError, match="give a name"):
        reward_terms({})
