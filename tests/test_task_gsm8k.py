"""End to end: the tiny model trains a few steps on a GSM8K-format file with a composed reward."""

import json
import logging
import math

import pytest
from conftest import compose_train
from test_train import small_overrides

from gspo_cli.train.loop import train

QUESTIONS = [(f"What is {a} plus {b}?", a + b) for a in range(1, 5) for b in range(1, 4)]  # 12 problems


def test_gsm8k_trains_with_weighted_rewards_and_survives_a_failing_one(tmp_path, cache_dir, monkeypatch, caplog):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"{q[8:-1]} = {s}\n#### {s}"}) + "\n"
                            for q, s in QUESTIONS))
    (tmp_path / "flaky_rewards_mod.py").write_text(
        "def always_fails(completion, answer):\n    raise RuntimeError('this reward is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_train(small_overrides(cache_dir, steps=2) + [
        "task=gsm8k", f"task.path={data}", "task.num_eval=4",
        "model.warm_start.enabled=false",  # the warm start teaches arithmetic answers; not this task
        "task.reward={math:1.0,format:0.5,overlong:{buffer_tokens:2},broken:{_target_:flaky_rewards_mod.always_fails}}",
    ])
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="gspo_cli.data.rewards"):
        train(cfg, run_dir)

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    components = {"math": 1.0, "format": 0.5, "overlong": 1.0, "broken": 1.0}
    for line in lines[:2]:
        for name in ["reward/mean", "grad_norm", "eval/reward"] + [f"reward/{c}/mean" for c in components]:
            assert math.isfinite(line[name]), (name, line)
        # The total is the weighted sum of the components, so its mean is the weighted sum of theirs.
        assert line["reward/mean"] == pytest.approx(sum(w * line[f"reward/{c}/mean"] for c, w in components.items()),
                                                    abs=1e-5)
        assert line["reward/errors"] == 8 * 4  # every call of the broken reward (prompts x G) failed, and scored 0
        assert line["reward/broken/mean"] == 0.0
        # 4-token responses and a 2-token buffer: the penalty is 0, -0.5 or -1 for 2, 3, 4 tokens.
        assert -1.0 <= line["reward/overlong/mean"] <= 0.0
    assert sum("failed on a sample" in r.getMessage() for r in caplog.records) == 1  # shown once, in full
    assert "this reward is broken" in caplog.text
