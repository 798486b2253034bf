"""k-sample metrics against brute force and hand-worked cases; `gspo eval` on checkpoints laid out
like Qwen3's (`tests/real_checkpoint.py`) and on the warm-started test model."""

import itertools
import json
import math

import pytest
import torch
from conftest import compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_train import small_overrides
from wandb_files import read_finished_wandb_log

from gspo_cli.cli import CONF_DIR
from gspo_cli.config import EvalConfig, register_configs
from gspo_cli.data.tasks import build_task
from gspo_cli.evaluate import k_sample_metrics, maj_at_k, pass_at_k, run_eval, vote_key
from gspo_cli.train.loop import resolve_model_path


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_cases():
    # n=4, c=1, k=2: the 3 pairs without the correct sample out of C(4,2)=6 fail -> 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # k=1 is the plain success rate c/n
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # fewer wrong samples than k: every k-subset holds a correct one
    assert pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0
    # large n stays exact (integer binomials): 1 - C(90,10)/C(100,10)
    assert pass_at_k(100, 10, 10) == pytest.approx(1 - math.comb(90, 10) / math.comb(100, 10))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)  # k > n


def test_maj_at_k_majority_and_ties():
    # clear majority: "12" three times (correct) against "13" once
    assert maj_at_k(["12", "12", "13", "12"], [True, True, False, True]) == 1.0
    # the majority is wrong, even though one sample is right
    assert maj_at_k(["13", "13", "12"], [False, False, True]) == 0.0
    # two-way tie, one of the two answers correct: expected score of a random tie-break = 1/2
    assert maj_at_k(["12", "13", "13", "12"], [True, False, False, True]) == 0.5
    # three-way tie of singletons, one correct: 1/3, whatever the order
    assert maj_at_k(["7", "12", "9"], [False, True, False]) == pytest.approx(1 / 3)
    assert maj_at_k(["12", "9", "7"], [True, False, False]) == pytest.approx(1 / 3)
    # whitespace does not split a vote: " 12" and "12\n" are one answer with 2 votes against 1
    assert maj_at_k([" 12", "13", "12\n"], [True, False, True]) == 1.0
    # a tie where both answers are wrong
    assert maj_at_k(["1", "2"], [False, False]) == 0.0


def test_votes_go_to_the_final_answer_not_the_wording():
    completions = ["7+5 makes \\boxed{12}", "so it is 12", "#### 12", "13"]
    assert [vote_key(c) for c in completions] == ["12", "12", "12", "13"]
    assert vote_key("  twelve ") == "twelve"  # no number: the text itself votes
    # three differently worded 12s (the last scored wrong by a strict format reward) beat one 13:
    # the winner scores the share of its votes that were correct, 2/3
    assert maj_at_k([vote_key(c) for c in completions], [True, True, False, False]) == pytest.approx(2 / 3)


def test_k_sample_metrics_on_a_hand_made_batch():
    # P=2 problems, n=4 samples, k=2.
    correct = torch.tensor([[True, False, False, True],    # c=2
                            [False, False, False, False]])  # c=0
    answers = [["5", "6", "6", "5"], ["1", "2", "1", "3"]]
    m = k_sample_metrics(correct, answers, k=2)
    # mean@2: 2 correct of 8 samples
    assert m["eval/mean@2"] == pytest.approx(0.25)
    # pass@2: problem 1: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; problem 2: 0 -> mean 5/12
    assert m["eval/pass@2"] == pytest.approx(5 / 12)
    # maj@2 on the first 2 samples: problem 1 ties "5" (right) with "6" (wrong) -> 0.5; problem 2 -> 0
    assert m["eval/maj@2"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------- the `gspo eval` job


def compose_eval(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    return OmegaConf.to_object(cfg)


def eval_job(overrides, run_dir):
    """`gspo eval OVERRIDES` in this process: composed, and told what the command line set."""
    return run_eval(compose_eval(overrides), run_dir, overrides)


@pytest.fixture(scope="module")
def warm_model_dir(cache_dir):
    """The warm-started test model of `small_overrides` (right some of the time on one-digit sums)."""
    cfg = compose_train(small_overrides(cache_dir))
    return resolve_model_path(cfg, build_task(cfg.task), log=print)


def test_eval_config_composes_with_its_defaults():
    cfg = compose_eval(["checkpoint=some/dir"])
    assert isinstance(cfg, EvalConfig)
    assert (cfg.eval.k, cfg.eval.n, cfg.eval.max_new_tokens, cfg.task.name) == (8, None, 8, "arithmetic")


def test_greedy_sampling_makes_every_k_metric_equal_greedy_accuracy(tmp_path, real_checkpoint_dir, real_base_dir):
    # Checkpoints laid out like Qwen3's, prompted through their chat template; responses end at
    # <|im_end|> (their generation config's end token). At temperature 0 all n samples are the
    # greedy response, so mean@k = pass@k = maj@k = accuracy: a check that samples are grouped
    # per problem and scored against the right answers.
    results = eval_job([f"checkpoint=[{real_checkpoint_dir},{real_base_dir}]", "task.max_operand=9",
                        "task.num_eval=20", "task.chat_template=true", "eval.k=3", "eval.n=4", "eval.temperature=0",
                        "eval.max_new_tokens=12", "logger=none"], tmp_path)
    tuned = results[0]["metrics"]
    assert 0 < tuned["eval/accuracy"] < 1  # the fine-tuned checkpoint is right some of the time
    assert tuned["eval/response_length"] <= 3  # one or two digits, then <|im_end|>
    for name in ("eval/mean@3", "eval/pass@3", "eval/maj@3"):
        assert tuned[name] == pytest.approx(tuned["eval/accuracy"]), name
    assert tuned["eval/sample_response_length"] == pytest.approx(tuned["eval/response_length"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert [r["checkpoint"] for r in saved["results"]] == [str(real_checkpoint_dir), str(real_base_dir)]
    assert saved["num_problems"] == 20


def test_sampled_eval_logs_a_wandb_eval_run(tmp_path, warm_model_dir):
    metrics = eval_job([f"checkpoint={warm_model_dir}", "task.max_operand=9", "task.num_eval=20",
                        "eval.k=4", "eval.n=8", "eval.max_new_tokens=4"], tmp_path)[0]["metrics"]
    # one sample right at rate p: pass@4 = 1 - (1-p)^4 on average, never below mean@4
    assert 0 < metrics["eval/mean@4"] <= metrics["eval/pass@4"] <= 1
    assert 0 <= metrics["eval/maj@4"] <= 1
    logs = list(tmp_path.rglob("run-*.wandb"))
    assert len(logs) == 1
    records = read_finished_wandb_log(logs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "eval"


def test_a_model_with_no_task_given_is_told_the_default_task_in_one_line_before_it_is_evaluated(
        tmp_path, capsys, real_base_dir):
    # Issue 30: a plain Hugging Face directory, no run config, no task on the command line.
    overrides = [f"checkpoint={real_base_dir}", "eval.k=1", "eval.max_new_tokens=2", "logger=none"]
    eval_job(overrides, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    notices = [i for i, line in enumerate(lines) if "no task was given" in line]
    assert len(notices) == 1, lines
    assert lines[notices[0]].startswith(f"{real_base_dir} is not a `gspo train` run and no task was given: "
                                        "evaluating on the default task of conf/eval.yaml, task=arithmetic,")
    assert notices[0] < next(i for i, line in enumerate(lines) if "held-out evaluation" in line)  # above the table


def test_eval_stop_strings_end_greedy_and_sampled_responses(tmp_path, warm_model_dir):
    # The warm-started model answers "a+b=" with digits then its end token: ended at the first
    # digit by the stop strings, every response is one token long (where that token is a digit).
    overrides = [f"checkpoint={warm_model_dir}", "task.max_operand=9", "task.num_eval=20", "eval.k=2",
                 "eval.max_new_tokens=4", "eval.stop_strings=[0,1,2,3,4,5,6,7,8,9]", "logger=none"]
    metrics = eval_job(overrides, tmp_path)[0]["metrics"]
    unstopped = eval_job(overrides[:-2] + ["logger=none"], tmp_path / "unstopped")[0]["metrics"]
    assert metrics["eval/response_length"] == 1.0 < unstopped["eval/response_length"]
    assert metrics["eval/sample_response_length"] == 1.0 < unstopped["eval/sample_response_length"]
