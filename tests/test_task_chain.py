"""`task=arithmetic-chain`: worked solutions of controlled length, and the final-answer verifier."""

import random

import pytest
from conftest import compose_train

from gspo_cli.data.rewards import final_answer_match
from gspo_cli.data.tasks import (Problem, arithmetic_chain_problems, build_task, chain_problem,
                                 repeated_chain_problem)
from gspo_cli.models.build import build_char_tokenizer

SOLUTION = "37+5=42\n42-3=39\n#### 39"


@pytest.mark.parametrize("completion,expected", [
    (SOLUTION, 1.0),                              # the reference itself
    ("37+5=42\n42-3=38\n#### 39", 1.0),           # a wrong step, right answer: only the answer counts
    ("#### 39", 1.0),                             # no working at all, right answer
    ("37+5=42\n42-3=39\n#### 39\n", 1.0),         # trailing whitespace
    ("37+5=42\n42-3=39\n#### 38", 0.0),           # wrong answer
    ("37+5=42\n42-3=39\n#### 390", 0.0),          # longer number
    ("37+5=42\n42-3=39", 0.0),                    # no final line (cut off at max_new_tokens)
    ("37+5=42\n42-3=39\n#### ", 0.0),             # an empty answer
    ("37+5=42\n42-3=39\n#### 39\n42", 0.0),       # text after the answer line: malformed
    ("37+5=42\n42-3=39 #### 39", 0.0),            # the marker not on a line of its own
    ("37+5=42\n42-3=39\n####39", 0.0),            # no space after the marker
    ("", 0.0),
])
def test_final_answer_match(completion, expected):
    assert final_answer_match(completion, SOLUTION) == expected


def test_final_answer_match_needs_a_reference_with_a_final_line():
    with pytest.raises(ValueError, match="reference"):
        final_answer_match("#### 3", "3")


def test_a_chain_problem_by_hand():
    # Replay the generator's draws: a start total, then per operation an operator and an operand.
    problem = chain_problem(random.Random(0), 3, 9, "+-")
    rng = random.Random(0)
    total = rng.randint(0, 99)
    assert problem.prompt.startswith(str(total))
    lines = problem.answer.split("\n")
    assert len(lines) == 4 and lines[-1].startswith("#### ")
    # Every line is "a<op>b=c" with c = a <op> b, and each line starts from the last total.
    operations = []
    for line in lines[:-1]:
        left, result = line.split("=")
        op = "+" if "+" in left else "-"
        a, b = (int(x) for x in left.split(op))
        assert a == total and 0 <= b <= 9 and int(result) == (a + b if op == "+" else a - b)
        assert 0 <= int(result) <= 99
        operations.append(f"{op}{b}")
        total = int(result)
    assert lines[-1] == f"#### {total}"
    # The prompt is the start and the operations in order, ending in "=".
    assert problem.prompt == str(random.Random(0).randint(0, 99)) + "".join(operations) + "="
    assert final_answer_match(problem.answer, problem.answer) == 1.0


def test_a_repeated_chain_by_hand():
    assert repeated_chain_problem(random.Random(0), 3, 9, "+") == repeated_chain_problem(random.Random(0), 3, 9, "+")
    # Replay the generator's draws: the operator, the operand, then the start total.
    for seed in range(20):
        problem = repeated_chain_problem(random.Random(seed), 4, 9, "+-")
        rng = random.Random(seed)
        op, operand = rng.choice("+-"), rng.randint(1, 9)
        start = rng.randint(0, 199) + (4 * operand if op == "-" else 0)
        assert problem.prompt == f"{start}{op}{operand}x4="
        lines = problem.answer.split("\n")
        assert len(lines) == 5
        total = start
        for count, line in zip((4, 3, 2, 1), lines):  # counted down, each line from the last total
            new = total + operand if op == "+" else total - operand
            assert line == f"{count}:{total}{op}{operand}={new}" and new >= 0
            total = new
        assert lines[-1] == f"#### {total}" and final_answer_match(problem.answer, problem.answer) == 1.0
    # By hand: 37+5 three times (draws fixed: operator "+", operand 5, start 37).
    draws = iter([5, 37])
    fixed = type("Fixed", (), {"choice": lambda self, ops: "+", "randint": lambda self, lo, hi: next(draws)})()
    assert repeated_chain_problem(fixed, 3, 9, "+") == Problem("37+5x3=", "3:37+5=42\n2:42+5=47\n1:47+5=52\n#### 52")


def test_chain_problems_are_distinct_and_seeded():
    first = arithmetic_chain_problems(500, 2, 9, "+-", seed=3)
    assert len({p.prompt for p in first}) == 500
    assert first == arithmetic_chain_problems(500, 2, 9, "+-", seed=3)
    assert first != arithmetic_chain_problems(500, 2, 9, "+-", seed=4)
    with pytest.raises(ValueError, match=r"\+-"):
        arithmetic_chain_problems(10, 2, 9, "*", seed=0)
    with pytest.raises(ValueError, match="chain_form"):
        arithmetic_chain_problems(10, 2, 9, "+-", seed=0, form="nested")
    repeated = arithmetic_chain_problems(500, 10, 9, "+-", seed=3, form="repeated")
    assert len({p.prompt for p in repeated}) == 500 and all("x10=" in p.prompt for p in repeated)


@pytest.mark.parametrize("form,chain_length,low,high", [
    ("listed", 3, 25, 35), ("listed", 8, 60, 80), ("listed", 62, 470, 520),
    ("repeated", 2, 28, 34), ("repeated", 10, 115, 128), ("repeated", 39, 480, 505),
])
def test_chain_length_sets_the_reference_length_in_tokens(form, chain_length, low, high):
    cfg = compose_train(["task=arithmetic-chain", f"task.chain_length={chain_length}", "task.num_problems=400",
                         "task.num_eval=40", f"task.chain_form={form}"])
    task = build_task(cfg.task)
    tokenizer = build_char_tokenizer()
    # The response the warm start teaches: the worked solution and the end-of-sequence token.
    lengths = [len(ids) + 1 for ids in tokenizer([p.answer for p in task.train], add_special_tokens=False)["input_ids"]]
    assert low <= sum(lengths) / len(lengths) <= high
    assert len(task.train) == 360 and len(task.eval) == 40
    assert not {p.prompt for p in task.train} & {p.prompt for p in task.eval}
    # The task's reward is the final-answer verifier: the reference scores 1, a cut-off one 0.
    problem = task.train[0]
    assert task.reward(problem.answer, problem.answer) == 1.0
    assert task.reward(problem.answer[:-3], problem.answer) == 0.0


@pytest.mark.slow  # two warm starts of 300 supervised steps: ~1-2 minutes on 2 quiet cores
def test_chain_length_sets_the_response_length_of_the_warm_started_model(tiny_model_dir):
    """What the parameter is for: the model RL starts from writes worked solutions as long as
    the chain asks for (greedy, on held-out problems), ~8 tokens per operation plus 7."""
    from gspo_cli.config import TaskConfig, WarmStartConfig
    from gspo_cli.models.loading import load_model, load_tokenizer
    from gspo_cli.rollout.evaluation import greedy_eval
    from gspo_cli.train.warmstart import warm_start

    lengths = {}
    for chain_length in (2, 6):
        model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
        task = build_task(TaskConfig(name="arithmetic-chain", reward="final_answer_match", chain_length=chain_length,
                                     max_operand=9, operators="+-", num_problems=2000, num_eval=64))
        cfg = WarmStartConfig(enabled=True, target_accuracy=1.0, max_steps=300, check_every=100, lr=1e-2)
        warm_start(model, tokenizer, task, cfg, max_new_tokens=8 * chain_length + 16, log=print)
        metrics, _ = greedy_eval(model, tokenizer, task, task.eval, 8 * chain_length + 16)
        lengths[chain_length] = metrics["eval/response_length"]
        reference = sum(len(p.answer) + 1 for p in task.eval) / len(task.eval)  # one token per character
        assert abs(metrics["eval/response_length"] - reference) <= 0.15 * reference, (chain_length, metrics, reference)
    assert lengths[6] > 2 * lengths[2]
