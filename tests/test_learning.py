"""The acceptance runs of the default configuration (slow: about two minutes on 2 cores)."""

import json

import pytest
from conftest import compose_train

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

