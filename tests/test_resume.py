"""Runs that survive: SIGKILL between checkpoints and `resume=auto` reproduce the uninterrupted run,
in one process and (slow) in two, where each rank gets its own random states back."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from dist_workers import rng_round_trip_worker
from test_dist import free_port
from test_train import small_overrides

from gspo_cli.train.checkpoint import STATE_FILE, load_trainer_state, own_rng_state
from gspo_cli.train.distributed import DistEnv

STEPS = 6


def command(cache_dir, run_dir, *extra):
    return [sys.executable, "-m", "gspo_cli", "train", *small_overrides(cache_dir, "gspo", steps=STEPS),
            "logger=none", "trainer.save_every=2", "trainer.keep_last=3", "trainer.eval_every=2",
            f"hydra.run.dir={run_dir}", *extra]


def env():
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def metrics(run_dir):
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


def wait_until(condition, process, what, timeout=240):
    """Poll `condition()` until it holds; fail at once if the child has exited, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run exited ({process.returncode}) before {what}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


# `gspo train` in a process that SIGKILLs itself as it is about to log step 3: after the
# checkpoint of step 2 and before the one of step 4, at a point that does not depend on how
# fast the machine is (a kill sent from outside can land after the run has finished).
KILLED_IN_STEP_3 = """
import os, signal
from gspo_cli.cli import main
from gspo_cli.report.logs import RunLogger
log = RunLogger.log
def log_or_die(self, metrics, step):
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    log(self, metrics, step)
RunLogger.log = log_or_die
main()
"""


def test_sigkill_then_resume_logs_exactly_the_uninterrupted_metrics(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    done = subprocess.run(command(cache_dir, straight), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    args = command(cache_dir, killed)[3:]  # after `python -m gspo_cli`
    crashed = subprocess.run([sys.executable, "-c", KILLED_IN_STEP_3, *args], env=env(), capture_output=True,
                             text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert [r["step"] for r in metrics(killed)] == [0, 1, 2]  # cut short in step 3
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_2"]

    resumed = subprocess.run(command(cache_dir, killed, "resume=auto"), env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    # Exact by construction: the resumed process gets the weights, AdamW state, random states and prompt
    # stream back bit for bit and runs the same kernels on the same CPU and threads as the straight one.
    assert metrics(killed) == metrics(straight)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(cache_dir, run_dir, "trainer.save_every=0", "trainer.max_steps=1000"),
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "metrics.jsonl"
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, process, "two logged steps")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "stopped by a signal" in out and "Traceback" not in err
    checkpoints = list((run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.pt").exists()


# The same under torchrun: `gspo train` whose ranks run KILLED_RANK instead of `-m gspo_cli.launch`:
# each rank SIGKILLs itself as it is about to log step 3, and torchrun ends the job.
KILLED_RANK = """
import os, signal
from gspo_cli.launch import worker_main
from gspo_cli.report.logs import RunLogger
log = RunLogger.log
def log_or_die(self, metrics, step):
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    log(self, metrics, step)
RunLogger.log = log_or_die
worker_main()
"""
RANKS_KILLED = """
from gspo_cli import launch
from gspo_cli.cli import main
command = launch.torchrun_command
launch.torchrun_command = lambda hardware, run_dir: command(hardware, run_dir)[:-3] + [RANK_SCRIPT, str(run_dir)]
main()
"""


def close_metrics(run_dir):
    """`metrics` without memory figures (each process's own peak): what a resumed run reproduces."""
    return [{k: v for k, v in r.items() if not k.startswith("memory/")} for r in metrics(run_dir)]


@pytest.mark.slow  # three torchrun jobs of 2 processes: 2.5-3 min each on 2 shared cores (~70 s of CPU)
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_killed_then_resumed_log_the_uninterrupted_metrics(strategy, tmp_path, cache_dir):
    """Each rank samples with a generator of its own (seeded `seed + rank`): a checkpoint holds every
    rank's random states and a resume gives each rank its own back, so rank 1 does not continue
    with rank 0's draws."""
    two = ["hardware=cpu-2proc", f"hardware.strategy={strategy}"]
    straight = tmp_path / "straight"
    done = subprocess.run(command(cache_dir, straight, *two), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    rank_script = tmp_path / "killed_rank.py"
    rank_script.write_text(KILLED_RANK)
    launcher = RANKS_KILLED.replace("RANK_SCRIPT", repr(str(rank_script)))
    args = command(cache_dir, killed, *two)[3:]  # after `python -m gspo_cli`
    crashed = subprocess.run([sys.executable, "-c", launcher, *args], env=env(), capture_output=True, text=True,
                             timeout=600)
    assert crashed.returncode != 0 and "torchrun exited" in crashed.stderr, crashed.stderr[-3000:]
    assert [r["step"] for r in metrics(killed)] == [0, 1, 2]  # cut short in step 3
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step_2"]

    resumed = subprocess.run(command(cache_dir, killed, *two, "resume=auto"), env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    expected, got = close_metrics(straight), close_metrics(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(STEPS + 1))
    for want, have in zip(expected, got):  # separate processes: equal to float rounding
        assert have.keys() == want.keys()
        assert have == pytest.approx(want, rel=1e-5, abs=1e-7), want["step"]


def test_each_rank_gets_its_own_random_states_back(tmp_path):
    """The part of a multi-process resume that is not model or optimizer: two ranks seeded
    `seed + rank` save their states as a checkpoint does, and each restores its own (not rank 0's)."""
    out = tmp_path / "rng"
    mp.spawn(rng_round_trip_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert [r["saved_ranks"] for r in ranks] == [2, 0]  # every rank's states, in rank 0's file
    assert ranks[0]["expected"][0] != ranks[1]["expected"][0]  # the ranks draw differently ...
    for rank in ranks:  # ... and each continues its own draws: the same generator states, so exactly
        assert rank["restored"] == rank["expected"]


def test_random_states_of_another_world_size_are_not_restored():
    """A checkpoint's states fit only a run of as many ranks; one written before states were kept
    per rank (a dict: rank 0's, the GPU sampler's apart) is rank 0's of a one-rank run."""
    saved = {"rng": [{"generator": "rank 0"}, {"generator": "rank 1"}]}
    assert own_rng_state(saved, DistEnv(rank=1, world_size=2)) == {"generator": "rank 1"}
    assert own_rng_state(saved, DistEnv(rank=0, world_size=1)) is None
    assert own_rng_state(saved, DistEnv(rank=3, world_size=4)) is None
    old = {"rng": {"generator": "rank 0"}, "sampling_rng": "gpu"}
    assert own_rng_state(old, DistEnv()) == {"generator": "rank 0", "sampling": "gpu"}
    assert own_rng_state(old, DistEnv(rank=1, world_size=2)) is None


def test_a_resume_by_another_number_of_ranks_says_so_and_continues(tmp_path, cache_dir, capsys):
    """The checkpoint of a one-process run passed off as two ranks' (as after a resume on more or
    fewer GPUs): the resumed run warns that each rank samples from a fresh seed, and trains on."""
    from conftest import compose_train

    from gspo_cli.train.loop import train

    run_dir = tmp_path / "run"
    overrides = small_overrides(cache_dir, steps=2) + ["logger=none", "trainer.save_every=1"]
    train(compose_train(overrides), run_dir)
    checkpoint = run_dir / "checkpoints" / "step_1"
    state = load_trainer_state(checkpoint)
    torch.save({**state, "rng": state["rng"] * 2}, checkpoint / STATE_FILE)
    capsys.readouterr()
    train(compose_train(overrides + ["resume=auto"]), run_dir)
    out = capsys.readouterr().out
    assert "holds the random states of 2 rank(s), not 1: each rank samples from a fresh seed" in out
    assert f"resumed from {checkpoint} at step 1" in out
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2]  # step 0 of the first run, then on from 1
