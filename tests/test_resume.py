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
