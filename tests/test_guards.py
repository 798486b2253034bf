"""Guards: bad-step counting, collapse warnings, and the warning of runs without learning signal."""

import torch

from gspo_cli.train.guards import BadStepCounter, CollapseMonitor, NoSignalMonitor


def test_bad_steps_must_be_in_a_row():
    counter = BadStepCounter(limit=2)
    assert not counter.update(skipped=4, num_updates=4)
    assert not counter.update(skipped=1, num_updates=4)  # a partly good step resets the count
    assert not counter.update(skipped=4, num_updates=4)
    assert counter.update(skipped=4, num_updates=4)


def test_reward_collapse_warns_once():
    monitor = CollapseMonitor(smoothing=0.0)  # no smoothing: each value is its own average
    assert monitor.update(0.6, 1.0) is None
    assert monitor.update(0.5, 1.0) is None  # 0.5 ≥ 0.5 · 0.6
    message = monitor.update(0.2, 1.0)  # 0.2 < 0.3
    assert message and "reward collapsed" in message
    assert monitor.update(0.1, 1.0) is None  # only once


def test_entropy_collapse_against_the_first_value():
    monitor = CollapseMonitor(smoothing=0.0)
    assert monitor.update(0.0, 2.0) is None  # a zero reward is too low to collapse from
    assert monitor.update(0.0, 1.1) is None
    assert "entropy collapsed" in monitor.update(0.0, 0.9)


def test_non_finite_updates_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, cache_dir, monkeypatch):
    import json

    import pytest
    import torch
    from conftest import compose_train
    from test_train import small_overrides

    from gspo_cli.algo.losses import LOSSES
    from gspo_cli.data.tasks import build_task
    from gspo_cli.models.loading import load_model
    from gspo_cli.train.checkpoint import latest_checkpoint
    from gspo_cli.train.guards import TrainingDiverged
    from gspo_cli.train.loop import resolve_model_path, train

    real = LOSSES["gspo"]

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setitem(LOSSES, "gspo", poisoned)
    # Weight decay, so that even an optimizer step with zero gradients would change the weights.
    cfg = compose_train(small_overrides(cache_dir, steps=5) + ["logger=none", "trainer.max_bad_steps=2",
                                                               "trainer.weight_decay=0.1"])
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        train(cfg, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["faults/skipped_steps"] for r in records] == [4, 4]  # every mini-batch of both steps
    saved = latest_checkpoint(tmp_path)
    assert saved.name == "step_2"
    # Nothing was applied: the saved weights are the starting ones (the warm-started model),
    # bit for bit, as no optimizer step ran.
    start = load_model(resolve_model_path(cfg, build_task(cfg.task), log=print)).state_dict()
    saved_weights = load_model(saved / "model").state_dict()
    assert saved_weights.keys() == start.keys()
    for name, value in saved_weights.items():
        assert torch.equal(value, start[name]), name


def test_one_nan_minibatch_is_skipped_counted_and_training_goes_on(tmp_path, cache_dir, monkeypatch):
    import json
    import math

    from conftest import compose_train
    from test_train import small_overrides

    from gspo_cli.algo.losses import LOSSES
    from gspo_cli.train.loop import train

    real, calls = LOSSES["gspo"], {"n": 0}

    def nan_once(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setitem(LOSSES, "gspo", nan_once)
    cfg = compose_train(small_overrides(cache_dir, steps=3) + ["logger=none"])
    train(cfg, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("faults/skipped_steps") for r in records] == [1, 0, 0, None]  # the last: final eval only
    # The step's averages are those of its three applied mini-batches: no NaN leaks into them.
    assert all(math.isfinite(r[name]) for r in records[:3] for name in ("loss", "grad_norm", "clip/fraction"))
    assert (tmp_path / "checkpoints" / "final" / "config.json").exists()


def signal_record(reward_mean: float, truncated_fraction: float) -> dict[str, float]:
    return {"reward/mean": reward_mean, "response/truncated_fraction": truncated_fraction}


def test_no_signal_warns_once_after_enough_steps_in_a_row():
    # G = 2. flat: groups (0, 0) and (1, 1), equal within each group, so every advantage is 0.
    flat, mixed = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    monitor = NoSignalMonitor(steps=3)
    assert monitor.update(flat, 2, signal_record(0.5, 0.0)) is None
    assert monitor.update(flat, 2, signal_record(0.5, 0.0)) is None
    assert monitor.update(mixed, 2, signal_record(0.75, 0.0)) is None  # one group with signal: count again
    assert monitor.update(flat, 2, signal_record(0.5, 0.0)) is None
    assert monitor.update(flat, 2, signal_record(0.5, 0.0)) is None
    message = monitor.update(flat, 2, signal_record(0.5, 0.0))
    assert message.startswith("warning: no learning signal for 3 steps in a row") and "cannot learn" in message
    assert "reward does not tell a prompt's responses apart (reward mean 0.5)" in message
    assert monitor.update(flat, 2, signal_record(0.5, 0.0)) is None  # once per run
    off = NoSignalMonitor(steps=0)
    assert all(off.update(flat, 2, signal_record(0.5, 0.0)) is None for _ in range(10))


def test_no_signal_names_the_causes_the_numbers_point_to():
    zeros, ones = torch.zeros(8), torch.ones(8)
    # Truncated responses that never match: both causes, with the observed numbers.
    monitor = NoSignalMonitor(steps=2)
    monitor.update(zeros, 4, signal_record(0.0, 1.0))
    message = monitor.update(zeros, 4, signal_record(0.0, 0.9))
    assert "responses are cut at trainer.max_new_tokens before any stop token (truncated fraction 0.95)" in message
    assert "the reward never matches (reward mean 0)" in message
    # Every response right and none cut: the task is too easy; truncation is not blamed.
    monitor = NoSignalMonitor(steps=2)
    monitor.update(ones, 4, signal_record(1.0, 0.0))
    message = monitor.update(ones, 4, signal_record(1.0, 0.1))
    assert "every response is already right (reward mean 1)" in message and "truncated fraction 0.05" in message
    assert "cut at" not in message and "never matches" not in message


def test_a_run_whose_reward_is_always_zero_warns_once(tmp_path, cache_dir, capsys):
    from conftest import compose_train
    from test_train import small_overrides

    from gspo_cli.train.loop import train

    # The test model without its warm start: random weights, never the right sum.
    cfg = compose_train(small_overrides(cache_dir, steps=3) + ["logger=none", "model.warm_start.enabled=false",
                                                                "trainer.no_signal_warn_steps=2"])
    train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert out.count("no learning signal") == 1, out
    assert "no learning signal for 2 steps in a row" in out and "the reward never matches (reward mean 0)" in out
