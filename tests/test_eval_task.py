"""Which task `gspo eval` scores a checkpoint on (`gspo_cli/eval_task.py`): a run's own, what the
command line sets on top, the defaults otherwise; hand-made run directories, no model."""

import dataclasses

import pytest
import yaml

from gspo_cli.config import EvalConfig, EvalSamplingConfig, TaskConfig
from gspo_cli.eval_task import (COMMAND_LINE, DEFAULTS, describe, given_keys, merged_settings, read_run_settings,
                                run_config_file, settings_for)

CHAT_TASK = {"name": "jsonl", "path": "train.jsonl", "eval_path": "eval.jsonl", "chat_template": True,
             "system_prompt": "Be brief.", "chat_template_kwargs": {"enable_thinking": False}}


def write_run(run_dir, task=CHAT_TASK, max_new_tokens=24, stop_strings=("<|im_end|>",), name="config.yaml"):
    """A run directory as `gspo train` leaves it, as far as `gspo eval` reads it: its config."""
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    config = {"task": dict(task), "trainer": {"max_new_tokens": max_new_tokens, "stop_strings": list(stop_strings)},
              "algo": {"name": "gspo"}, "seed": 0}
    (run_dir / name).write_text(yaml.safe_dump(config))
    return run_dir


def test_given_keys_of_hydra_overrides():
    assert given_keys(["task=jsonl", "++task.path=a.jsonl", "+task.reward._target_=m.f", "~task.system_prompt",
                       "eval.k=4", "checkpoint=[a,b]"]) == [
        "task", "task.path", "task.reward._target_", "task.system_prompt", "eval.k", "checkpoint"]


def test_the_run_s_config_is_found_from_the_run_and_from_its_checkpoints(tmp_path):
    run = write_run(tmp_path / "run")
    for inside in ("", "checkpoints/final", "checkpoints/step_4", "checkpoints/step_4/model"):
        assert run_config_file(str(run / inside)) == run / "config.yaml", inside
    older = write_run(tmp_path / "older", name=".hydra/config.yaml")  # only Hydra's copy
    assert run_config_file(str(older / "checkpoints" / "final")) == older / ".hydra" / "config.yaml"
    (tmp_path / "model").mkdir()
    assert run_config_file(str(tmp_path / "model")) is None
    assert run_config_file("Qwen/Qwen3-0.6B") is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("lr: 0.1\n")  # someone else's config.yaml: not a run
    assert read_run_settings(str(tmp_path / "other")) is None


def test_a_run_s_checkpoint_is_scored_on_the_run_s_task_length_and_stop_strings(tmp_path):
    run = read_run_settings(str(write_run(tmp_path / "run") / "checkpoints" / "final"))
    settings = merged_settings(EvalConfig(), [], run)
    # every task key the run set, and the schema's defaults for the others (num_eval, seed, ...)
    assert settings.task == {**dataclasses.asdict(TaskConfig()), **CHAT_TASK}
    assert (settings.max_new_tokens, settings.stop_strings) == (24, ["<|im_end|>"])
    assert settings.origins == {f"the run's config ({tmp_path / 'run' / 'config.yaml'})":
                                ["task", "trainer.max_new_tokens", "trainer.stop_strings"]}


def test_the_command_line_wins_key_by_key(tmp_path):
    run = read_run_settings(str(write_run(tmp_path / "run")))
    cli = EvalConfig(task=TaskConfig(num_eval=50, chat_template_kwargs={"foo": 1}),
                     eval=EvalSamplingConfig(max_new_tokens=64))
    given = ["task.num_eval", "task.chat_template_kwargs.foo", "eval.max_new_tokens", "eval.k"]
    settings = merged_settings(cli, given, run)
    # one key of the run's task changed, a nested one added to the run's own kwargs
    assert settings.task == {**dataclasses.asdict(TaskConfig()), **CHAT_TASK, "num_eval": 50,
                             "chat_template_kwargs": {"enable_thinking": False, "foo": 1}}
    assert (settings.max_new_tokens, settings.stop_strings) == (64, ["<|im_end|>"])
    assert settings.origins[COMMAND_LINE] == ["task.num_eval", "task.chat_template_kwargs.foo", "eval.max_new_tokens"]
    # a task named on the command line is the whole task: nothing of the run's is left
    named = merged_settings(EvalConfig(task=TaskConfig(name="arithmetic", max_operand=9)), ["task", "task.max_operand"],
                            run)
    assert named.task == dataclasses.asdict(TaskConfig(max_operand=9)) and named.max_new_tokens == 24
    assert named.origins[COMMAND_LINE] == ["task"]


def test_runs_on_different_tasks_are_one_error_naming_what_differs(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", task={**CHAT_TASK, "path": "other.jsonl"}, max_new_tokens=8)
    paths = [str(a), str(b)]
    runs = [read_run_settings(p) for p in paths]
    with pytest.raises(ValueError) as error:
        settings_for(paths, EvalConfig(), ["eval.k"], runs)
    message = str(error.value)
    assert "\n" not in message
    assert f"task.path (train.jsonl in {a}, other.jsonl in {b})" in message, message
    assert f"eval.max_new_tokens (24 in {a}, 8 in {b})" in message, message
    assert "task.eval_path" not in message  # only what differs
    # named on the command line, they are compared on one task
    cli = EvalConfig(task=TaskConfig(name="jsonl", path="x.jsonl"), eval=EvalSamplingConfig(max_new_tokens=16))
    named = settings_for(paths, cli, ["task", "task.path", "eval.max_new_tokens"], runs)
    assert named[0].values() == named[1].values() and named[0].task["path"] == "x.jsonl"


def test_a_model_beside_a_run_is_scored_on_the_run_s_task(tmp_path):
    run = write_run(tmp_path / "run")
    paths = [str(run), "Qwen/Qwen3-0.6B"]
    trained, base = settings_for(paths, EvalConfig(), [], [read_run_settings(p) for p in paths])
    assert base.values() == trained.values() and base.task["path"] == "train.jsonl"
    assert list(base.origins) == [f"the config of the run listed with it ({run / 'config.yaml'})"]


def test_a_model_alone_with_no_task_given_says_in_one_line_which_task_the_defaults_are():
    settings = settings_for(["Qwen/Qwen3-0.6B"], EvalConfig(), ["eval.k"], [None])[0]
    assert settings.task == dataclasses.asdict(TaskConfig()) and settings.origins[DEFAULTS][0] == "task"
    line = describe("Qwen/Qwen3-0.6B", settings)
    assert line == ("Qwen/Qwen3-0.6B is not a `gspo train` run and no task was given: evaluating on the default task "
                    "of conf/eval.yaml, task=arithmetic, eval.max_new_tokens=8, eval.stop_strings=[]; "
                    "name another with task=NAME")
    # a task key given on the command line is a task chosen: the line says where each part came from
    chosen = settings_for(["m"], EvalConfig(task=TaskConfig(max_operand=9)), ["task.max_operand"], [None])[0]
    assert describe("m", chosen) == ("m: task=arithmetic max_operand=9, eval.max_new_tokens=8, eval.stop_strings=[]; "
                                     "from the defaults (conf/eval.yaml): task, eval.max_new_tokens, "
                                     "eval.stop_strings; from the command line: task.max_operand")
