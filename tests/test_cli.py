"""The `gspo` command as a user runs it: a subprocess, a Hydra run directory, a plot."""

import json
import os
import subprocess
import sys

import pytest

from test_train import small_overrides


def run_gspo(*args, cwd=None):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "gspo_cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


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


def test_unknown_option_fails_with_the_choices_and_no_traceback():
    result = run_gspo("train", "algo=gpso")
    assert result.returncode != 0
    assert "grpo" in result.stderr and "Traceback" not in result.stderr


def test_unknown_command_is_an_error():
    result = run_gspo("trian")
    assert result.returncode == 2 and "usage" in result.stderr
