"""Checkpoints: atomic, pruned, weights-only, and RNG states restored exactly."""

import random

import numpy as np
import pytest
import torch

from gspo_cli.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state(generator)
    torch.save(state, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True), generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()) == expected


def test_save_keeps_the_last_n_and_ignores_partial_ones(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, tokenizer, {"stream": {"epoch": 0, "index": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_6"]
    # A directory left by a killed save (no trainer state yet) is not a checkpoint.
    (tmp_path / "checkpoints" / "step_8" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step_10-abc").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_6"
    state = load_trainer_state(latest_checkpoint(tmp_path))
    assert state["step"] == 6 and state["stream"]["index"] == 6


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "checkpoints" / "step_1" / "model").mkdir(parents=True)
    torch.save({"step": 1, "x": Evil()}, tmp_path / "checkpoints" / "step_1" / "trainer_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        load_trainer_state(tmp_path / "checkpoints" / "step_1")


def test_a_write_interrupted_midway_leaves_the_previous_checkpoint_to_resume_from(tmp_path, tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    save_checkpoint(tmp_path, 2, model, tokenizer, {"stream": {"epoch": 0, "index": 2}}, keep_last=2)

    def killed(*args, **kwargs):  # the process dies after the weights, before the trainer state
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, model, tokenizer, {"stream": {"epoch": 0, "index": 4}}, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    assert not (tmp_path / "checkpoints" / "step_4").exists()
    assert load_trainer_state(latest_checkpoint(tmp_path))["stream"]["index"] == 2
