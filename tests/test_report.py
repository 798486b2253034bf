"""Sweep reports from hand-made run directories: summaries, the grid, an interrupted sweep."""

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from gspo_cli.report.plots import mean_band
from gspo_cli.report.sweep import (build_report, by_setting, collect_sweep, grid, grouped, record_job, steps_to_target,
                                   summarize_records)

PNG = b"\x89PNG\r\n\x1a\n"


def test_steps_to_target_is_the_first_crossing():
    points = [(0, 0.4), (10, 0.62), (20, 0.55), (30, 0.7)]
    assert steps_to_target(points, 0.6) == 10  # reached at 10, lost at 20: still 10
    assert steps_to_target(points, 0.4) == 0
    assert steps_to_target(points, 0.71) is None


def test_summarize_records_of_a_finished_and_an_unfinished_run():
    records = [
        {"step": 0, "eval/accuracy": 0.5, "clip/fraction": 0.001},
        {"step": 1, "eval/accuracy": 0.7, "clip/fraction": 0.003},
        {"step": 2, "eval/accuracy": 0.6},  # the final evaluation
    ]
    s = summarize_records(records, max_steps=2, target=0.65)
    assert s["finished"] and s["final_accuracy"] == 0.6
    assert (s["best_accuracy"], s["best_step"]) == (0.7, 1)
    assert s["mean_clip_fraction"] == pytest.approx(0.002)  # (0.001 + 0.003) / 2
    assert s["steps_to_target"] == 1
    cut = summarize_records(records[:2], max_steps=2, target=0.65)
    assert not cut["finished"] and cut["final_accuracy"] is None and cut["last_step"] == 1


def test_a_run_collapsed_when_it_ends_far_below_its_best_or_its_start():
    def run(*accuracies):
        records = [{"step": i, "eval/accuracy": a, "routing/volatility": 0.1 * i} for i, a in enumerate(accuracies)]
        return summarize_records(records, max_steps=len(accuracies) - 1, target=0.9)

    assert run(0.5, 0.8, 0.7)["collapsed"] is False  # 0.10 below its best: noise, not a collapse
    assert run(0.5, 0.8, 0.6)["collapsed"] is True  # learned, then lost 0.20
    assert run(0.5, 0.48, 0.44)["collapsed"] is True  # only lost: 0.06 below its start
    assert run(0.5, 0.8, 0.6)["start_accuracy"] == 0.5
    assert run(0.5, 0.8, 0.6)["mean_volatility"] == pytest.approx(0.1)  # (0 + 0.1 + 0.2) / 3
    unfinished = summarize_records([{"step": 0, "eval/accuracy": 0.5}, {"step": 1}], max_steps=2, target=0.9)
    assert unfinished["collapsed"] is None


def test_grid_expands_like_hydras_basic_sweeper_and_the_command_line_narrows_it():
    params = {"model": "tiny-qwen3-moe", "algo": "gspo,grpo", "seed": "0,1,2"}
    swept, jobs = grid(params, [])
    assert swept == {"algo", "seed"} and len(jobs) == 6  # 2 algorithms x 3 seeds
    assert jobs[0] == ["model=tiny-qwen3-moe", "algo=gspo", "seed=0"]
    assert jobs[3] == ["model=tiny-qwen3-moe", "algo=grpo", "seed=0"]
    swept, jobs = grid(params, ["seed=0", "trainer.lr=1e-3,1e-4"])
    assert swept == {"algo", "trainer.lr"} and len(jobs) == 4  # seed fixed, lr swept
    # Hydra writes swept floats in its own form, as it does in each job's overrides.yaml
    assert jobs[1] == ["model=tiny-qwen3-moe", "algo=gspo", "seed=0", "trainer.lr=0.0001"]


def test_mean_band_over_runs_of_unequal_length():
    steps, mean, low, high = mean_band([[(0, 0.2), (1, 0.4)], [(0, 0.4), (1, 0.8)], [(0, 0.6)]])
    assert steps == [0, 1]
    assert mean == pytest.approx([0.4, 0.6])  # step 1: only the two runs that reached it
    assert (low, high) == ([0.2, 0.4], [0.6, 0.8])


# ---------------------------------------------------------------------------- an interrupted sweep


def write_job(sweep: Path, num: int, algo: str, seed: int, records: list[dict], max_steps: int = 2,
              job_info: dict | None = None, extra: tuple[str, ...] = ()) -> None:
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": algo}, "seed": seed, "trainer": {"max_steps": max_steps}}),
                   run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["trainer.max_steps=2", f"algo={algo}", f"seed={seed}", *extra]),
                   run / ".hydra" / "overrides.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if job_info is not None:
        (run / "job.json").write_text(json.dumps(job_info))


def make_interrupted_sweep(sweep: Path) -> None:
    """4 planned jobs (gspo, grpo x seeds 0, 1): 0-2 finished, 3 killed after step 1."""
    hydra = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                   "params": {"algo": "gspo,grpo", "seed": "0,1,2"}},
                       "overrides": {"task": ["trainer.max_steps=2", "seed=0,1"]}}}
    sweep.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(hydra), sweep / "multirun.yaml")

    def curve(a0, a2, clip):
        return [{"step": 0, "eval/accuracy": a0, "reward/mean": a0, "clip/fraction": clip},
                {"step": 1, "reward/mean": a2, "clip/fraction": clip},
                {"step": 2, "eval/accuracy": a2}]

    write_job(sweep, 0, "gspo", 0, curve(0.5, 0.7, 1e-3), job_info={"status": "finished", "wall_time_s": 12.0})
    write_job(sweep, 1, "gspo", 1, curve(0.5, 0.5, 3e-3), job_info={"status": "finished", "wall_time_s": 14.0})
    write_job(sweep, 2, "grpo", 0, curve(0.5, 0.6, 1e-5), job_info={"status": "finished", "wall_time_s": 13.0})
    write_job(sweep, 3, "grpo", 1, curve(0.5, 0.6, 1e-5)[:2])  # killed: no final evaluation, no job.json
    with open(sweep / "3" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "eval/acc')  # ... and killed in the middle of writing a line


def test_report_of_an_interrupted_sweep_names_what_did_not_finish(tmp_path):
    sweep = tmp_path / "sweep"
    make_interrupted_sweep(sweep)
    out = io.StringIO()
    summaries = build_report(sweep, target=0.65, console=Console(file=out, width=200))

    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "finished"), ("1", "finished"), ("2", "finished"), ("3", "incomplete")]
    assert [r["overrides"] for r in rows] == ["algo=gspo seed=0", "algo=gspo seed=1",
                                             "algo=grpo seed=0", "algo=grpo seed=1"]
    first = rows[0]
    assert (first["algo"], first["seed"], first["final_accuracy"], first["best_accuracy"]) == ("gspo", "0", "0.7", "0.7")
    assert first["steps_to_target"] == "2" and rows[1]["steps_to_target"] == ""  # 0.5 never reaches 0.65
    assert float(first["mean_clip_fraction"]) == pytest.approx(1e-3)
    assert float(first["wall_time_s"]) == 12.0
    assert rows[3]["final_accuracy"] == "" and rows[3]["last_step"] == "1"
    assert summaries[3].wall_time_s is not None  # from file times, as the job never wrote job.json

    text = out.getvalue()
    assert "not finished: job 3 (algo=grpo seed=1) stopped at step 1 of 2" in text
    assert "per algorithm" in text and "0.600 (0.500–0.700)" in text  # gspo: final 0.7 and 0.5
    for png in ("accuracy_reward.png", "clip_fraction.png"):
        assert (sweep / png).read_bytes()[:8] == PNG


def test_report_lists_planned_jobs_that_never_started(tmp_path):
    sweep = tmp_path / "sweep"
    make_interrupted_sweep(sweep)
    # multirun.yaml plans algo=gspo,grpo x seed=0,1 (the command line narrowed seed=0,1,2):
    # jobs 0-3 all have directories, so nothing is missing
    out = io.StringIO()
    build_report(sweep, console=Console(file=out, width=200))
    assert "not started" not in out.getvalue()
    # a sweep stopped before job 2 (grpo, seed 0) began leaves no directory for it
    shutil.rmtree(sweep / "2")
    out = io.StringIO()
    summaries = build_report(sweep, console=Console(file=out, width=200))
    assert [(s.job, s.status, s.overrides) for s in summaries] == [
        ("0", "finished", "algo=gspo seed=0"), ("1", "finished", "algo=gspo seed=1"),
        ("2", "not started", "algo=grpo seed=0"), ("3", "incomplete", "algo=grpo seed=1")]
    assert "not started: job 2 (algo=grpo seed=0)" in out.getvalue()


def test_report_of_a_sweep_with_a_failed_job_names_it_with_its_error(tmp_path):
    sweep = tmp_path / "sweep"
    make_interrupted_sweep(sweep)
    # Job 3 did not just stop: it failed after logging step 1, and said why in job.json.
    (sweep / "3" / "job.json").write_text(json.dumps(
        {"status": "failed", "error": "RuntimeError: out of memory", "wall_time_s": 5.0}))
    out = io.StringIO()
    summaries = build_report(sweep, target=0.65, console=Console(file=out, width=200))

    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "finished"), ("1", "finished"), ("2", "finished"), ("3", "failed")]
    assert (rows[3]["error"], rows[3]["wall_time_s"], rows[3]["last_step"]) == ("RuntimeError: out of memory", "5", "1")
    assert rows[3]["final_accuracy"] == ""
    text = out.getvalue()
    assert "failed: job 3 (algo=grpo seed=1): RuntimeError: out of memory" in text
    assert "not finished" not in text  # failed, not merely incomplete
    # The failed run stays out of the per-algorithm figures: grpo counts its one finished run.
    assert [s.job for s in summaries if s.status == "finished"] == ["0", "1", "2"]
    assert "0.600 (0.600–0.600)" in text  # grpo's final and best accuracy: job 2's alone
    for png in ("accuracy_reward.png", "clip_fraction.png"):
        assert (sweep / png).read_bytes()[:8] == PNG


def test_failed_job_is_recorded_with_its_error(tmp_path):
    with pytest.raises(RuntimeError):
        with record_job(tmp_path):
            raise RuntimeError("out of memory\nmore detail")
    info = json.loads((tmp_path / "job.json").read_text())
    assert info["status"] == "failed" and info["error"] == "RuntimeError: out of memory"
    assert info["wall_time_s"] >= 0


def test_report_of_a_directory_without_runs_is_a_clear_error(tmp_path, capsys):
    from gspo_cli.cli import report_command

    with pytest.raises(SystemExit) as exit_info:
        report_command([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds no run directories" in capsys.readouterr().err


def test_report_of_a_moe_sweep_over_lengths_draws_volatility_and_results_by_length(tmp_path):
    """The paper sweep's figures: routing volatility per update, and results against a second
    swept setting (the response length), per algorithm."""
    sweep = tmp_path / "sweep"
    hydra = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                   "params": {"algo": "gspo,grpo", "task.chain_length": "3,14"}},
                       "overrides": {"task": ["trainer.max_steps=2", "seed=0"]}}}
    sweep.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(hydra), sweep / "multirun.yaml")
    job = 0
    for algo, final in (("gspo", 0.8), ("grpo", 0.3)):
        for length in (3, 14):
            records = [{"step": 0, "eval/accuracy": 0.5, "clip/fraction": 0.1, "response_length/mean": 8 * length,
                        "routing/volatility": 0.05, "routing/volatility/minibatch_0": 0.0,
                        "routing/volatility/minibatch_1": 0.1},
                       {"step": 1, "clip/fraction": 0.1, "routing/volatility": 0.05},
                       {"step": 2, "eval/accuracy": final}]
            write_job(sweep, job, algo, 0, records, job_info={"status": "finished", "wall_time_s": 1.0},
                      extra=(f"task.chain_length={length}",))
            job += 1
    out = io.StringIO()
    build_report(sweep, console=Console(file=out, width=250))

    text = out.getvalue()
    assert "sweep sweep: 4 jobs" in text and "volatility" in text and "collapsed" in text
    group_rows = text[text.index("per algorithm"):text.index("against the baseline")].splitlines()
    rows = {line.split("│")[1].strip(): line for line in group_rows if "task.chain_length=" in line}
    assert sorted(rows) == ["grpo task.chain_length=14", "grpo task.chain_length=3",
                            "gspo task.chain_length=14", "gspo task.chain_length=3"]
    for label, line in rows.items():  # grpo ended 0.2 below its start: collapsed, gspo did not
        assert ("1/1" if label.startswith("grpo") else "0/1") in line.split("│")[6], line
    for png in ("routing_volatility.png", "by_setting.png"):
        assert (sweep / png).read_bytes()[:8] == PNG
    # What by_setting.png draws: per algorithm, each length in sweep order, the gain over its own start.
    summaries, _ = collect_sweep(sweep)
    series = by_setting(grouped(summaries))
    assert [setting for setting, _ in series["grpo"]] == ["task.chain_length=3", "task.chain_length=14"]
    gains = {algo: [v["eval/accuracy gained (final - step 0)"].estimate for _, v in points]
             for algo, points in series.items()}
    assert gains["gspo"] == pytest.approx([0.3, 0.3]) and gains["grpo"] == pytest.approx([-0.2, -0.2])
    assert [v["response_length/mean"].estimate for _, v in series["gspo"]] == [24, 112]
    assert series["gspo"][0][1]["final eval/accuracy"].low is None  # one seed per point: no error bar


# ---------------------------------------------------------------------------- intervals and paired comparisons


def correct_line(step: int, right: int, total: int = 10, problems: str = "p10") -> str:
    """An `eval_correct.jsonl` line: the first `right` of `total` problems answered correctly."""
    return json.dumps({"step": step, "problems": problems, "correct": [1] * right + [0] * (total - right)}) + "\n"


def test_collapse_is_a_drop_larger_than_its_interval():
    from gspo_cli.report.eval_records import EvalCorrect

    def run(outcomes):  # per step: problems answered right (the first k of n)
        records = [{"step": i, "eval/accuracy": k / n} for i, (k, n) in enumerate(outcomes)]
        correct = {i: EvalCorrect(i, "p", (1,) * k + (0,) * (n - k)) for i, (k, n) in enumerate(outcomes)}
        return summarize_records(records, max_steps=len(outcomes) - 1, target=0.9, correct=correct)

    # 20 problems: 0.5 -> best 0.8 -> 0.6; problems 12-15 lost: d = −1 on 4 of 20, mean −0.2,
    # s_d = √((4·0.64 + 16·0.04)/19) = 0.41039, se = 0.09177, t_0.975(19) = 2.09302: (−0.3921, −0.0079).
    big = run([(10, 20), (16, 20), (12, 20)])
    assert (big["collapse"], big["collapsed"], big["drop_from_step"]) == ("collapsed", True, 1)
    assert big["drop"] == pytest.approx(-0.2)
    assert (big["drop_ci_low"], big["drop_ci_high"]) == pytest.approx((-0.3921, -0.0079), abs=1e-4)
    # 5 problems: 0.4 -> 1.0 -> 0.8, the same rule met, but d = −1 on 1 of 5: se = 0.2, t_0.975(4) = 2.77645:
    # (−0.7553, 0.3553) includes 0: named, not called a collapse.
    small = run([(2, 5), (5, 5), (4, 5)])
    assert (small["collapse"], small["collapsed"]) == ("drop within noise", False)
    assert (small["drop_ci_low"], small["drop_ci_high"]) == pytest.approx((-0.7553, 0.3553), abs=1e-4)
    # final 8 of 10: its 95% Wilson interval over the problems
    assert (run([(8, 10), (8, 10)])["final_ci_low"], run([(8, 10), (8, 10)])["final_ci_high"]) == pytest.approx(
        (0.49016, 0.94332), abs=1e-5)


def make_sweep_with_problem_records(sweep: Path) -> None:
    """gspo and grpo x seeds 0, 1, 2 and gspo-token x seed 0, each final evaluation on the same 10 problems."""
    hydra = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                   "params": {"algo": "gspo,grpo,gspo-token", "seed": "0,1,2"}},
                       "overrides": {"task": ["trainer.max_steps=2"]}}}
    sweep.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(hydra), sweep / "multirun.yaml")
    right = {("gspo", 0): 8, ("gspo", 1): 7, ("gspo", 2): 6, ("grpo", 0): 6, ("grpo", 1): 5, ("grpo", 2): 5,
             ("gspo-token", 0): 9}
    for job, ((algo, seed), k) in enumerate(right.items()):
        records = [{"step": 0, "eval/accuracy": 0.5, "clip/fraction": 0.01, "clip/fraction_nonzero_adv": 0.02,
                    "reward/uniform_groups": 0.5},
                   {"step": 1, "clip/fraction": 0.03, "clip/fraction_nonzero_adv": 0.04, "reward/uniform_groups": 0.25},
                   {"step": 2, "eval/accuracy": k / 10}]
        write_job(sweep, job, algo, seed, records, job_info={"status": "finished", "wall_time_s": 1.0})
        (sweep / str(job) / "eval_correct.jsonl").write_text(correct_line(0, 5) + correct_line(2, k))


def test_report_states_intervals_n_and_paired_comparisons_against_the_baseline(tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep_with_problem_records(sweep)
    out = io.StringIO()
    build_report(sweep, console=Console(file=out, width=250))  # default baseline: the first swept algo, gspo
    text = out.getvalue()
    rows = {r["job"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}

    # per run: Wilson over the 10 problems (8 of 10: 0.49016, 0.94332)
    assert (float(rows["0"]["final_ci_low"]), float(rows["0"]["final_ci_high"])) == pytest.approx(
        (0.49016, 0.94332), abs=1e-5)
    assert rows["0"]["eval_problems"] == "10" and "0.800 [0.490, 0.943]" in text
    # per group: gspo 0.8, 0.7, 0.6: 0.7 ± 4.30265·0.1/√3 = (0.45158, 0.94842), n = 3
    gspo = rows["0"]
    assert (gspo["group"], gspo["group_n"]) == ("gspo", "3")
    assert (float(gspo["group_final_ci_low"]), float(gspo["group_final_ci_high"])) == pytest.approx(
        (0.45158, 0.94842), abs=1e-5)
    assert "0.700 [0.452, 0.948] n=3" in text
    # grpo 0.6, 0.5, 0.5: mean 0.53333, s = 0.057735, ± 4.30265·0.033333 = ± 0.143422
    assert (float(rows["3"]["group_final_ci_low"]), float(rows["3"]["group_final_ci_high"])) == pytest.approx(
        (0.38991, 0.67676), abs=1e-5)
    # gspo-token has one seed: n=1, no interval, never an interval borrowed from elsewhere
    assert rows["6"]["group_n"] == "1" and rows["6"]["group_final_ci_low"] == ""
    assert "0.900 n=1" in text
    # grpo against gspo, paired on seeds 0, 1, 2 x 10 problems: only gspo right on 2 + 2 + 1 of 30 pairs
    # (problems 6, 7 on seed 0; 5, 6 on seed 1; 5 on seed 2). Each problem one cluster, its seeds averaged:
    # d = [0] * 5 + [−2/3, −2/3, −1/3] + [0, 0], mean −1/6, s_d = 0.283279, se = 0.089581,
    # t_0.975(9) = 2.26216: (−0.36931, +0.03598), t = −1.86052 on 9 df. (Treated as 30 independent pairs,
    # as before clustering: (−0.30820, −0.02513), p 0.0226, "significant" from problem 5's and 6's repeats.)
    grpo = rows["3"]
    assert grpo["baseline"] == "gspo" and grpo["vs_baseline_pairs"] == "30" and grpo["vs_baseline_seeds"] == "3"
    assert grpo["vs_baseline_problems"] == "10"
    assert float(grpo["vs_baseline_diff"]) == pytest.approx(-1 / 6, abs=1e-5)
    assert (float(grpo["vs_baseline_ci_low"]), float(grpo["vs_baseline_ci_high"])) == pytest.approx(
        (-0.36931, 0.03598), abs=1e-5)
    assert float(grpo["vs_baseline_p"]) == pytest.approx(0.095734, abs=1e-6)
    # over seeds: −0.2, −0.2, −0.1: mean −0.16667, s = 0.057735: ± 0.143422 -> (−0.31009, −0.02324)
    assert (float(grpo["vs_baseline_seed_ci_low"]), float(grpo["vs_baseline_seed_ci_high"])) == pytest.approx(
        (-0.31009, -0.02324), abs=1e-5)
    table = text[text.index("against the baseline algo=gspo"):]
    grpo_row = next(line for line in table.splitlines() if line.startswith("│ grpo"))
    assert "-0.167 [-0.369, 0.036] n=30 / 10 problems" in grpo_row and "0.0957" in grpo_row and "0 / 5" in grpo_row
    # gspo-token against gspo on seed 0 alone: +0.1 over 10 pairs (t_0.975(9) = 2.26216: ± 0.226216)
    token = rows["6"]
    assert (float(token["vs_baseline_ci_low"]), float(token["vs_baseline_ci_high"])) == pytest.approx(
        (-0.12622, 0.32622), abs=1e-5)
    token_row = next(line for line in table.splitlines() if line.startswith("│ gspo-token"))
    assert "n=1: no interval" in token_row  # one shared seed: no interval over seeds
    # Holm over the report's two comparisons: gspo-token t = 1 on 9 df, p = 0.343436; grpo's smaller
    # p doubled, 0.191468; the larger kept (at least the smaller's adjusted value).
    assert float(token["vs_baseline_p"]) == pytest.approx(0.343436, abs=1e-6)
    assert float(grpo["vs_baseline_p_holm"]) == pytest.approx(2 * 0.095734, abs=2e-6)
    assert float(token["vs_baseline_p_holm"]) == pytest.approx(0.343436, abs=1e-6)
    assert "0.191" in grpo_row and "the 2 comparisons (Holm)" in " ".join(text.split())
    assert rows["0"]["vs_baseline_diff"] == "" and rows["0"]["baseline"] == "gspo"  # the baseline itself
    # the clip share over tokens with a non-zero advantage and the share of all-equal groups, per run and group
    assert float(rows["0"]["mean_clip_fraction_nonzero_adv"]) == pytest.approx(0.03)
    assert float(rows["0"]["mean_uniform_groups"]) == pytest.approx(0.375)
    assert "clip frac A≠0" in text and "uniform groups" in text
    for png in ("vs_baseline.png", "accuracy_reward.png", "clip_fraction.png"):
        assert (sweep / png).read_bytes()[:8] == PNG


def test_the_baseline_is_named_on_the_command_line(tmp_path, capsys):
    from gspo_cli.cli import report_command

    sweep = tmp_path / "sweep"
    make_sweep_with_problem_records(sweep)
    report_command([str(sweep), "report.baseline=grpo"])
    rows = {r["job"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert rows["0"]["baseline"] == "grpo" and float(rows["0"]["vs_baseline_diff"]) == pytest.approx(1 / 6, abs=1e-5)
    assert "against the baseline algo=grpo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report_command([str(sweep), "--baseline", "ppo"])
    assert "baseline 'ppo' matches no finished group" in capsys.readouterr().err
