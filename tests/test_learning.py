"""The acceptance runs of the default configuration (slow: two minutes each on 2 cores)."""

import json

import pytest
from conftest import compose_train
from test_cli import run_gspo

from gspo_cli.train.loop import train


def run(algo, tmp_path, cache_dir):
    cfg = compose_train([f"algo={algo}", f"cache_dir={cache_dir}", "logger=none", "trainer.save_final=false"])
    train(cfg, tmp_path / algo)
    return [json.loads(l) for l in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_gspo_and_grpo_learn_and_gspo_clips_far_more(tmp_path, cache_dir):
    clip = {}
    for algo in ("gspo", "grpo"):
        records = run(algo, tmp_path, cache_dir)
        first, last = records[0]["eval/accuracy"], records[-1]["eval/accuracy"]
        assert 0.40 <= first <= 0.75, (algo, first)  # the warm start lands in the useful range
        assert last - first >= 0.15, (algo, first, last)
        steps = [r for r in records if "clip/fraction" in r]
        clip[algo] = sum(r["clip/fraction"] for r in steps) / len(steps)
    assert clip["gspo"] >= 10 * clip["grpo"], clip



# Floating-point paths that stand in for other processors: another thread count, and the kernels
# a CPU without AVX-512 runs (ATen's vector dispatch, MKL's and oneDNN's instruction sets; the
# same as the native path on such a CPU). Each must be set before torch loads: a subprocess.
FLOATING_POINT_PATHS = {
    "1-thread": (["hardware.num_threads=1"], {}),
    "2-threads": (["hardware.num_threads=2"], {}),
    "avx2": (["hardware.num_threads=1"],
             {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(FLOATING_POINT_PATHS))
@pytest.mark.parametrize("warm_start_seed", [0, 1, 2])
def test_the_default_demo_gains_from_every_warm_start_on_other_floating_point_paths(warm_start_seed, path, tmp_path):
    """`gspo train` with the defaults, its warm start trained anew (an empty cache) on this path:
    the base lands near its target and GSPO gains at least 15 points."""
    overrides, env = FLOATING_POINT_PATHS[path]
    result = run_gspo("train", f"cache_dir={tmp_path / 'cache'}", "logger=none", "trainer.save_final=false",
                      f"model.warm_start.seed={warm_start_seed}", *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                      env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["eval/accuracy"], records[-1]["eval/accuracy"]
    print(f"warm-start seed {warm_start_seed}, {path}: held-out {first:.3f} -> {last:.3f}")
    assert abs(first - 0.45) <= 0.08, first  # held out, against the target 0.45 on training prompts
    assert last - first >= 0.15, (first, last)
