"""End to end: a 2-step run on a very small model changes it and logs every metric, finite."""

import json
import math

import pytest
import torch
from conftest import TEST_SPEC, compose_train
from wandb_files import history_by_step, read_finished_wandb_log

from gspo_cli.data.tasks import build_task
from gspo_cli.models.loading import load_model
from gspo_cli.report.eval_records import read_eval_correct
from gspo_cli.train.loop import resolve_model_path, train

STEP_METRICS = [
    "reward/mean", "reward/std", "clip/fraction", "clip/seq_fraction", "clip/low_fraction",
    "clip/high_fraction", "ratio/mean", "kl/old_new", "entropy", "response_length/mean",
    "response/truncated_fraction", "grad_norm", "lr", "time/step_s", "throughput/tokens_per_s",
]


def small_overrides(cache_dir, algo="gspo", steps=2):
    spec = ",".join(f"{k}:{v}" for k, v in vars(TEST_SPEC).items())
    return [
        f"algo={algo}", f"cache_dir={cache_dir}", "model.name=test-moe", f"model.build={{{spec}}}",
        # A few dozen supervised steps on one-digit sums give a base that is right some of the
        # time, so rewards vary within groups and the policy gradient is not zero.
        "model.warm_start.target_accuracy=0.3", "model.warm_start.lr=1e-2", "model.warm_start.check_every=25",
        "task.max_operand=9", "task.num_eval=20",
        f"trainer.max_steps={steps}", "trainer.prompts_per_step=8", "trainer.group_size=4",
        "trainer.max_new_tokens=4", "trainer.eval_every=1", "trainer.lr=1e-2",
    ]


@pytest.mark.parametrize("algo", ["gspo", "grpo", "gspo-token"])
def test_two_steps_change_the_model_and_log_finite_metrics(algo, tmp_path, cache_dir):
    cfg = compose_train(small_overrides(cache_dir, algo))
    run_dir = tmp_path / "run"
    train(cfg, run_dir)

    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2]  # two RL steps, then the final evaluation
    for line in lines[:2]:
        for name in STEP_METRICS + ["eval/accuracy", "eval/reward"]:
            assert math.isfinite(line[name]), (name, line)
    assert "eval/accuracy" in lines[2]
    # Which of the 20 held-out problems each evaluation answered: what gspo report pairs runs on.
    evals = read_eval_correct(run_dir)
    assert sorted(evals) == [0, 1, 2] and {len(e.correct) for e in evals.values()} == {20}
    for line in lines:
        assert evals[line["step"]].accuracy == pytest.approx(line["eval/accuracy"])
    assert any(line["reward/uniform_groups"] < 1.0 for line in lines[:2])  # the check below is made
    for line in lines[:2]:
        if line["reward/uniform_groups"] < 1.0:  # some group has a signal: tokens with A ≠ 0 exist
            # GSPO's clip needs A ≠ 0, so the clipped tokens are all among them
            assert line["clip/fraction_nonzero_adv"] == pytest.approx(line["clip/fraction"] / line["adv/nonzero_fraction"])

    start_dir = resolve_model_path(cfg, build_task(cfg.task), log=print)  # the cached warm start
    before = load_model(start_dir).state_dict()
    after = load_model(run_dir / "checkpoints" / "final").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # Every trained tensor moves (the router of every MoE layer included).
    assert len(changed) == len(before), set(before) - set(changed)


def test_wandb_offline_run_records_the_training_metrics(tmp_path, cache_dir):
    cfg = compose_train(small_overrides(cache_dir))
    train(cfg, tmp_path / "run")
    logs = list((tmp_path / "run").rglob("run-*.wandb"))
    assert len(logs) == 1
    history = history_by_step(read_finished_wandb_log(logs[0]))
    local = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in local[:2]:
        for name in ("reward/mean", "clip/fraction", "eval/accuracy"):
            assert history[line["step"]][name] == pytest.approx(line[name])


def test_resumed_run_continues_the_same_wandb_run(tmp_path, cache_dir):
    """A run checkpointed at step 2 and resumed (`resume=auto`) logs to the W&B run it started,
    not to a new one: both offline logs carry the run id saved in the checkpoint."""
    from gspo_cli.train.checkpoint import load_trainer_state

    run_dir = tmp_path / "run"
    train(compose_train(small_overrides(cache_dir, steps=3) + ["trainer.save_every=2"]), run_dir)
    saved_id = load_trainer_state(run_dir / "checkpoints" / "step_2")["wandb_id"]
    train(compose_train(small_overrides(cache_dir, steps=4) + ["trainer.save_every=2", "resume=auto"]), run_dir)

    logs = sorted(run_dir.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert len(logs) == 2  # one offline log per process
    runs = []
    for log in logs:
        records = read_finished_wandb_log(log)
        runs.append((next(r.run for r in records if r.WhichOneof("record_type") == "run"),
                     sorted(history_by_step(records))))
    (first, first_steps), (second, second_steps) = runs
    assert saved_id and first.run_id == second.run_id == saved_id
    assert first_steps == [0, 1, 2, 3] and second_steps == [2, 3, 4]  # the second from its checkpoint on
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3, 4]  # one uninterrupted local log
