"""Runs that survive: SIGKILL between checkpoints and `resume=auto` reproduce the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

from test_train import small_overrides

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


def wait_for(path, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_then_resume_logs_exactly_the_uninterrupted_metrics(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    done = subprocess.run(command(cache_dir, straight), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(cache_dir, killed), env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(killed / "checkpoints" / "step_2" / "trainer_state.pt", process)
    process.send_signal(signal.SIGKILL)  # somewhere in step 3 or 4: between checkpoints
    process.wait()
    interrupted = metrics(killed)
    assert len(interrupted) < STEPS + 1  # it really was cut short

    resumed = subprocess.run(command(cache_dir, killed, "resume=auto"), env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert metrics(killed) == metrics(straight)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(cache_dir, run_dir, "trainer.save_every=0", "trainer.max_steps=1000"),
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "metrics.jsonl", process)
    while len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "stopped by a signal" in out and "Traceback" not in err
    checkpoints = list((run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.pt").exists()
