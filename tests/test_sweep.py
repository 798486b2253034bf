"""`gspo sweep`: the arguments it hands to Hydra, a two-job sweep end to end, and one whose first job fails."""

import csv
import json

import pytest
from conftest import compose_train
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_cli import run_gspo
from test_train import small_overrides
from wandb_files import read_finished_wandb_log

from gspo_cli.cli import CONF_DIR, sweep_arguments
from gspo_cli.config import register_configs
from gspo_cli.data.tasks import build_task
from gspo_cli.report.sweep import DEFAULT_TARGET, grid


def test_default_grid_is_gspo_and_grpo_with_three_seeds_each():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+sweep=default"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    swept, jobs = grid(params, [])
    assert swept == {"algo", "seed"}
    assert [(j[1], j[2]) for j in jobs] == [(f"algo={a}", f"seed={s}") for a in ("gspo", "grpo") for s in (0, 1, 2)]
    assert set(params) == {"model", "algo", "seed"} and params["model"] == "tiny-qwen3-moe"


def sweep_jobs(name: str) -> list[list[str]]:
    """The overrides of every job of `conf/sweep/<name>.yaml`, as `gspo sweep sweep=<name>` launches them."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+sweep={name}"], return_hydra_config=True)
    return grid(OmegaConf.to_container(cfg.hydra.sweeper.params), [])[1]


PAPER_ALGOS = {"gspo": ("gspo", False), "gspo-token": ("gspo-token", False), "grpo": ("grpo", False),
               "grpo-replay": ("grpo", True)}  # algo: (loss, routing replay)


@pytest.mark.parametrize("name,seeds,chain_length,max_steps", [("paper", [0, 1, 2], 4, 60),
                                                                ("paper-quick", [0], 4, 30)])
def test_paper_sweeps_compose_into_four_algorithms_on_the_long_task_and_the_qwen3_shaped_moe(
        name, seeds, chain_length, max_steps):
    jobs = sweep_jobs(name)
    assert len(jobs) == 4 * len(seeds)
    seen = set()
    for job in jobs:  # every job composes as `gspo train` would compose it
        cfg = compose_train(job)
        assert (cfg.model.name, cfg.model.build.num_hidden_layers, cfg.model.build.num_experts) == ("small-qwen3-moe", 8, 32)
        assert cfg.model.build.num_experts_per_tok == 4
        assert (cfg.task.name, cfg.task.reward, cfg.task.chain_length) == ("arithmetic-chain", "final_answer_match",
                                                                           chain_length)
        assert cfg.trainer.max_new_tokens >= 8 * chain_length + 16  # room for the whole worked solution
        assert cfg.trainer.max_steps == max_steps and cfg.trainer.num_minibatches == 4
        assert (cfg.algo.loss, cfg.algo.routing_replay) == PAPER_ALGOS[cfg.algo.name]
        seen.add((cfg.algo.name, cfg.seed))
    assert seen == {(a, s) for a in PAPER_ALGOS for s in seeds}


def test_sweep_arguments_add_the_grid_a_directory_and_a_wandb_group():
    args, sweep_dir, target, report = sweep_arguments(["seed=0,1"], now="2025-01-02_03-04-05")
    assert args == ["--multirun", "seed=0,1", "+sweep=default",
                    "hydra.sweep.dir=outputs/sweeps/default-2025-01-02_03-04-05",
                    "logger.group=default-2025-01-02_03-04-05"]
    assert (sweep_dir, target, report) == ("outputs/sweeps/default-2025-01-02_03-04-05", DEFAULT_TARGET, True)


def test_sweep_arguments_keep_what_the_user_chose():
    args, sweep_dir, target, _ = sweep_arguments(
        ["sweep=smoke", "hydra.sweep.dir=/x/abl", "logger.group=mine", "--target", "0.8"], now="t")
    assert args == ["--multirun", "+sweep=smoke", "hydra.sweep.dir=/x/abl", "logger.group=mine"]
    assert (sweep_dir, target) == ("/x/abl", 0.8)
    *_, report = sweep_arguments(["--cfg", "job"], now="t")
    assert not report  # printing the config runs no job: nothing to report


def test_two_job_sweep_writes_runs_a_report_and_one_wandb_group(tmp_path, cache_dir):
    sweep_dir = tmp_path / "abl"
    overrides = [o for o in small_overrides(cache_dir) if not o.startswith("algo=")]
    # With the warm start (cached by the earlier tests of a session) rewards vary, the policy
    # moves and the figures compared below are not all zero.
    result = run_gspo("sweep", *overrides, "algo=gspo,grpo", "seed=0", f"hydra.sweep.dir={sweep_dir}",
                      "--target", "0.25")
    assert result.returncode == 0, result.stderr[-3000:]

    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["job"], r["algo"], r["seed"], r["status"]) for r in rows] == [
        ("0", "gspo", "0", "finished"), ("1", "grpo", "0", "finished")]
    for row in rows:
        assert row["overrides"] == f"algo={row['algo']}"  # seed=0 is not swept any more
        assert float(row["wall_time_s"]) > 0 and row["last_step"] == "2"
        # Each row summarises its own job's metrics.jsonl (summary.csv keeps 6 significant digits).
        records = [json.loads(l) for l in (sweep_dir / row["job"] / "metrics.jsonl").read_text().splitlines()]
        accuracy = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
        clip = [r["clip/fraction"] for r in records if "clip/fraction" in r]
        assert max(clip) > 0 and max(a for _, a in accuracy) > 0  # not a comparison of zeros
        assert float(row["final_accuracy"]) == pytest.approx(accuracy[-1][1], rel=1e-5)
        assert float(row["best_accuracy"]) == pytest.approx(max(a for _, a in accuracy), rel=1e-5)
        assert float(row["mean_clip_fraction"]) == pytest.approx(sum(clip) / len(clip), rel=1e-5)
        # The --target given to `gspo sweep` (not the default 0.7) is the one the report used.
        assert float(row["target_accuracy"]) == 0.25
        assert row["steps_to_target"] == str(next((s for s, a in accuracy if a >= 0.25), ""))
    for png in ("accuracy_reward.png", "clip_fraction.png"):
        assert (sweep_dir / png).stat().st_size > 0
    assert "finished runs per algorithm" in result.stdout

    # one offline W&B run per job, each finished (exit record), all in the group named after the sweep
    logs = sorted(sweep_dir.rglob("run-*.wandb"))
    assert [p.relative_to(sweep_dir).parts[0] for p in logs] == ["0", "1"]
    for log in logs:
        records = read_finished_wandb_log(log)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "abl"
        exit_record = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
        assert exit_record.exit_code == 0


def test_sweep_with_a_failing_job_still_reports_and_names_it(tmp_path, cache_dir):
    """The first job fails (a bad option, found before any work), so Hydra stops the sweep:
    `gspo sweep` exits non-zero, and its report lists the failed job with its error and the
    job that never started."""
    sweep_dir = tmp_path / "broken"
    result = run_gspo("sweep", *small_overrides(cache_dir), "algo.loss_agg=sum,token-mean", "seed=0",
                      f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode != 0
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "failed", "algo.loss_agg=sum"), ("1", "not started", "algo.loss_agg=token-mean")]
    assert rows[0]["error"].startswith("ValueError: algo.loss_agg='sum' is not one of")
    assert f"failed: job 0 (algo.loss_agg=sum): {rows[0]['error']}" in result.stdout
    assert "not started: job 1 (algo.loss_agg=token-mean)" in result.stdout
    assert "gspo: error: algo.loss_agg='sum'" in result.stderr and "Traceback" not in result.stderr


def test_sweep_through_the_submitit_launcher(tmp_path, cache_dir):
    """`hydra/launcher=submitit_local`: the jobs are pickled, submitted and run by submitit in
    processes of their own (the path `submitit_slurm` takes, without a scheduler); the report
    reads them back like any sweep."""
    sweep_dir = tmp_path / "submitit"
    overrides = [o for o in small_overrides(cache_dir) if not o.startswith("algo=")]
    result = run_gspo("sweep", *overrides, "algo=gspo,grpo", "seed=0", "logger=none",
                      "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1",
                      f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["algo"], r["status"], r["last_step"]) for r in rows] == [("gspo", "finished", "2"),
                                                                        ("grpo", "finished", "2")]
    assert list((sweep_dir / ".submitit").rglob("*_result.pkl"))  # submitit ran them, not the basic launcher


def test_the_length_study_sweeps_three_response_lengths_with_room_for_each():
    jobs = sweep_jobs("paper-lengths")
    assert len(jobs) == 12
    lengths, longest = {}, {}
    for job in jobs:
        cfg = compose_train(job)
        assert cfg.model.name == "small-qwen3-moe" and cfg.task.name == "arithmetic-chain"
        assert cfg.task.chain_form == "repeated"  # the same form at every length: only the length differs
        # the limit leaves room for the longest reference (end token included), and not much more;
        # a task is built once per length (building the 39-operation one is the slow part)
        if cfg.task.chain_length not in longest:
            task = build_task(cfg.task)
            longest[cfg.task.chain_length] = max(len(p.answer) + 1 for p in task.train + task.eval)  # a token a character
        most = longest[cfg.task.chain_length]
        assert most <= cfg.trainer.max_new_tokens <= most + 16, (cfg.task.chain_length, most)
        lengths.setdefault(cfg.task.chain_length, set()).add(cfg.algo.name)
    assert sorted(lengths) == [2, 10, 39] and all(len(algos) == 4 for algos in lengths.values())


FOLLOWUP_ALGOS = {"gspo", "gspo-token", "grpo", "luspo", "vespo", "icepop", "dppo", "clip-cov", "kl-cov", "grpo-opsm"}


def test_the_followups_sweep_runs_each_objective_on_the_paper_box_fresh_and_two_steps_stale():
    jobs = sweep_jobs("followups")
    assert len(jobs) == len(FOLLOWUP_ALGOS) * 2
    seen = set()
    for job in jobs:
        cfg = compose_train(job)
        assert (cfg.model.name, cfg.task.name, cfg.trainer.max_steps, cfg.seed) == ("small-qwen3-moe",
                                                                                    "arithmetic-chain", 30, 0)
        seen.add((cfg.algo.name, cfg.trainer.staleness))
    assert seen == {(a, k) for a in FOLLOWUP_ALGOS for k in (0, 2)}
