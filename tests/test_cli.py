"""The `gspo` command as a user runs it: a subprocess, a Hydra run directory, a plot."""

import json
import os
import subprocess
import sys

import pytest
from test_train import small_overrides


def run_gspo(*args, cwd=None, env=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gspo_cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_train_writes_a_hydra_run_directory_and_plot(tmp_path, cache_dir):
    run_dir = tmp_path / "outputs" / "run"
    result = run_gspo("train", *small_overrides(cache_dir), "logger=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").exists()  # the resolved config
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()
    assert (run_dir / "checkpoints" / "final" / "tokenizer.json").exists()
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # stdout is a pipe here: plain progress lines, not a live display
    assert "step 0/2" in result.stdout and "eval/accuracy" in result.stdout

    png = tmp_path / "curves.png"
    result = run_gspo("plot", str(run_dir), "--out", str(png))
    assert result.returncode == 0, result.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_stale_rollouts_runs_two_steps(tmp_path, cache_dir):
    """`gspo train trainer.staleness=2 algo=gspo`: step 0 trains on a batch of the initial weights
    (lag 0), step 1 on another one (lag 1), as the queue starts (docs/algorithms.md)."""
    run_dir = tmp_path / "run"
    result = run_gspo("train", *small_overrides(cache_dir), "trainer.staleness=2", "algo=gspo", "logger=none",
                      f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r.get("rollout/policy_lag") for r in records] == [0.0, 1.0, None]
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()


def test_unknown_option_fails_with_the_choices_and_no_traceback():
    result = run_gspo("train", "algo=gpso")
    assert result.returncode != 0
    assert "grpo" in result.stderr and "Traceback" not in result.stderr


def test_unknown_command_is_an_error():
    result = run_gspo("trian")
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("override,expected", [
    ("algo.clip_lwo=0.1", "did you mean algo.clip_low? Keys of algo:"),  # unknown key: the valid ones
    ("trainer.max_steps=many", "max_steps"),  # wrong type
    ("model.path=/no/such/model", "model.path=/no/such/model: no such directory"),
    ("trainer.num_minibatches=5", "does not split into trainer.num_minibatches=5"),
    ("+task.reward._target_=no_such_module.reward", "no_such_module"),
    ("trainer.staleness=-1", "trainer.staleness=-1: the steps a rollout waits to be trained on, 0 or more"),
])
def test_bad_input_is_one_line_without_traceback(override, expected, tmp_path, cache_dir):
    result = run_gspo("train", *small_overrides(cache_dir), "logger=none", f"hydra.run.dir={tmp_path}", override)
    assert result.returncode == 1, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_empty_data_file_is_a_clear_error(tmp_path, cache_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = run_gspo("train", *small_overrides(cache_dir), "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                      "task=gsm8k", f"task.path={data}")
    assert result.returncode == 1 and str(data) in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_malformed_data_file_names_its_line(tmp_path, cache_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1", "answer": "#### 2"}\n{"question": broken\n')
    result = run_gspo("train", *small_overrides(cache_dir), "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                      "task=gsm8k", f"task.path={data}")
    assert result.returncode == 1 and f"{data}:2" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_two_processes_leave_one_run_directory_with_one_line_per_step(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_gspo("train", *small_overrides(cache_dir), "logger=none", "hardware=cpu-2proc",
                      f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "final" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_dapo_dynamic_sampling_runs_on_two_fsdp_processes(tmp_path, cache_dir):
    # A user's run of what was refused before; the lockstep of the draws is tests/test_dist.py's.
    run_dir = tmp_path / "run"
    result = run_gspo("train", *small_overrides(cache_dir, algo="dapo"), "logger=none", "hardware=cpu-2proc",
                      "hardware.strategy=fsdp", "algo.max_refill_rounds=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(0 <= r["sampling/refills"] <= 3 for r in records[:2])


def test_ls_lists_every_group_with_the_first_comment_of_each_option():
    from gspo_cli.cli import CONF_DIR, config_menu

    menu = config_menu()
    assert {"model", "task", "algo", "hardware", "logger", "experiment", "sweep"} <= set(menu)
    algos = dict(menu["algo"])
    assert algos["gspo"].startswith("GSPO (arXiv 2507.18071")
    assert set(algos) == {p.stem for p in (CONF_DIR / "algo").glob("*.yaml")}
    result = run_gspo("ls", "algo")
    assert result.returncode == 0 and "dr-grpo" in result.stdout
    # GSPO's follow-ups (issue 27), each listed with the paper it comes from.
    followups = {"luspo": "2602.05261", "vespo": "2602.10693", "icepop": "2510.18855", "dppo": "2602.04879",
                 "clip-cov": "2505.22617", "kl-cov": "2505.22617", "grpo-opsm": "2512.02556"}
    for option, arxiv in followups.items():
        assert f" {option} " in result.stdout and arxiv in algos[option], option
    assert run_gspo("ls", "nope").returncode == 2


def launch_node(run_dir, cache_dir, port):
    """One "node" of a 2-node job on this machine: `gspo train` as a user runs it on each node."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "-m", "gspo_cli", "train", *small_overrides(cache_dir), "logger=none",
                             "hardware=cpu-2proc", "hardware.nproc_per_node=1", "hardware.nnodes=2",
                             f"hardware.rdzv_endpoint=127.0.0.1:{port}", f"hardware.rdzv_id=test{port}",
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.parametrize("shared", [True, False])
def test_two_nodes_share_one_run_directory_or_stop_with_a_clear_error(shared, tmp_path, cache_dir):
    """Two launches with a c10d rendezvous on localhost stand in for two nodes. With one run
    directory (a shared file system) they write one metrics.jsonl and both exit 0; with two
    (each node its own disk), both stop at start-up and say why."""
    from test_dist import free_port

    port = free_port()
    nodes = [launch_node(tmp_path / ("run" if shared or i == 0 else "other"), cache_dir, port) for i in range(2)]
    results = [(node.wait(timeout=300), *node.communicate()) for node in nodes]
    if shared:
        assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
        records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 1, 2]
        assert [p.name for p in tmp_path.iterdir()] == ["run"]
    else:
        for code, _, err in results:
            assert code != 0 and "do not see rank 0's run directory" in err, err[-2000:]


def write_sums_jsonl(path, problems):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    return path


def test_eval_of_a_run_scores_the_run_s_own_task_as_its_last_in_loop_evaluation(tmp_path, real_checkpoint_dir):
    # Issue 30: a chat-template JSONL run with 24-token responses, then `gspo eval checkpoint=[RUN]`
    # with no task given. It must score the problems the run evaluated on, as the run did: the
    # same greedy decoding of the same prompts by the same weights, so the same accuracy exactly.
    from gspo_cli.data.tasks import arithmetic_problems

    sums = arithmetic_problems(9, "+")  # the one-digit sums the checkpoint was tuned on
    train, held_out = write_sums_jsonl(tmp_path / "train.jsonl", sums[20:]), write_sums_jsonl(tmp_path / "eval.jsonl", sums[:20])
    run_dir = tmp_path / "run"
    result = run_gspo("train", "model=local", f"model.path={real_checkpoint_dir}", "task=jsonl", f"task.path={train}",
                      f"task.eval_path={held_out}", "task.chat_template=true", "trainer.max_new_tokens=24",
                      "trainer.max_steps=2", "trainer.prompts_per_step=8", "trainer.group_size=4",
                      "trainer.eval_every=1", "trainer.lr=1e-3", "logger=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 < last["eval/accuracy"] < 1, last  # a score that the wrong task or template would not give

    eval_dir = tmp_path / "eval"
    result = run_gspo("eval", f"checkpoint=[{run_dir}]", "eval.k=2", "logger=none", f"hydra.run.dir={eval_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((eval_dir / "eval.json").read_text())["results"][0]["metrics"]
    assert metrics["eval/accuracy"] == last["eval/accuracy"]
    assert metrics["eval/response_length"] == pytest.approx(last["eval/response_length"])
    # the same problems answered the same way, problem by problem (what gspo report pairs on)
    from gspo_cli.report.eval_records import read_eval_correct

    run_final = read_eval_correct(run_dir)[2]
    (evaluated,) = read_eval_correct(next(eval_dir.glob("0-*"))).values()
    assert (evaluated.problems, evaluated.correct) == (run_final.problems, run_final.correct)
    # and it says so, above the table: the run's task and where it came from
    said = result.stdout[:result.stdout.index("held-out evaluation")]
    assert "task=jsonl" in said and "chat_template=true" in said and "eval.max_new_tokens=24" in said, said
    assert f"from the run's config ({run_dir / 'config.yaml'}): task, trainer.max_new_tokens" in said, said


def test_eval_of_runs_trained_on_different_tasks_is_one_error_naming_what_differs(tmp_path):
    # Issue 30: two runs' checkpoints, no task on the command line: a table across tasks means nothing.
    runs = []
    for name, path in (("a", "sums.jsonl"), ("b", "products.jsonl")):
        runs.append(tmp_path / name)
        runs[-1].mkdir()
        (runs[-1] / "config.yaml").write_text(json.dumps({  # JSON is YAML: the part of a run's config eval reads
            "task": {"name": "jsonl", "path": path, "chat_template": True}, "trainer": {"max_new_tokens": 24}}))
    result = run_gspo("eval", f"checkpoint=[{runs[0]},{runs[1]}]", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"task.path (sums.jsonl in {runs[0]}, products.jsonl in {runs[1]})" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
