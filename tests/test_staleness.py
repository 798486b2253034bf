"""Stale rollouts (`trainer.staleness`, `gspo_cli/train/stale.py`): step t trains on the rows the
weights of step t − k sampled, divides by the policy `algo.old_logp` names (the behaviour one, or
the proximal one at the update), reports the gap between the two, and is deterministic and
resumable; k = 0 is the run without a queue."""

import copy
import shutil

import pytest
import torch
from conftest import compose_train
from run_records import assert_records_close, read_records
from test_train import small_overrides

import gspo_cli.train.loop as loop
import gspo_cli.train.steps as steps
import gspo_cli.train.update as update
from gspo_cli.algo.rollout_correction import logp_mismatch
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.checkpoint import STATE_FILE, load_trainer_state
from gspo_cli.train.stale import RolloutQueue


def overrides(cache_dir, staleness, steps=3, *extra):
    return small_overrides(cache_dir, steps=steps) + ["logger=none", f"trainer.staleness={staleness}", *extra]


def logprobs(model, rollout, temperature):
    """[N, T] log π of the sampled tokens under `model`, one full pass (no KV cache)."""
    with torch.no_grad():
        return response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1],
                                 temperature)


@pytest.mark.parametrize("source,extra", [
    ("rollout", []),
    ("rollout", ["algo.routing_replay=true"]),  # the behaviour policy's routes, replayed
    ("recompute", ["algo.rollout_correction=tis-token", "algo.routing_replay=true"]),  # the proximal policy's
])
def test_with_staleness_1_step_t_trains_on_rows_the_weights_of_step_t_minus_1_sampled(
        source, extra, tmp_path, cache_dir, monkeypatch):
    """Three steps with k = 1: step 0 and step 1 train on batches θ_0 sampled (the queue starts
    with k + 1 batches of the initial weights), step 2 on one θ_1 sampled. A copy of the weights
    at the start of each update gives, on the rows trained: the sampler's log-probabilities
    (the behaviour policy, θ_{t−1}); π_old (the behaviour policy with `old_logp=rollout`, the
    proximal one θ_t with `recompute`); and `mismatch/logp_abs_diff`, the gap between the two."""
    updates, losses, replayed = [], [], []
    original_update, original_loss, original_replaying = update.update_policy, update.minibatch_loss, update.replaying

    def recording_update(policy, optimizer, scheduler, batch, ctx):
        weights = copy.deepcopy(policy).eval()  # θ_t: the proximal policy of this update
        losses.append([])
        replayed.append([])
        metrics = original_update(policy, optimizer, scheduler, batch, ctx)
        updates.append((weights, batch, metrics))
        return metrics

    monkeypatch.setattr(loop, "update_policy", recording_update)
    monkeypatch.setattr(update, "minibatch_loss", lambda logp, old_logp, b, idx, c, n: losses[-1].append(
        (idx, old_logp.clone())) or original_loss(logp, old_logp, b, idx, c, n))
    monkeypatch.setattr(update, "replaying", lambda routing, routes, micro: replayed[-1].append(
        (routes, micro.rows)) or original_replaying(routing, routes, micro))
    cfg = compose_train(overrides(cache_dir, 1, 3, f"algo.old_logp={source}", *extra))
    replay = cfg.algo.routing_replay
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir)

    assert len(updates) == 3
    for t, (weights, batch, metrics) in enumerate(updates):
        rollout, mask = batch.rollout, batch.rollout.response_mask.bool()
        behaviour = logprobs(updates[max(t - 1, 0)][0], rollout, cfg.trainer.temperature)
        proximal = logprobs(weights, rollout, cfg.trainer.temperature)
        # Sampler (KV cache) or the trainer's passes against a full pass of the same weights, float32
        # on CPU, log-probabilities of 0 to -10: measured at most 5.5e-6 apart; the weights of another
        # step: 5 and more apart (trainer.lr=1e-2 on a tiny model). 1e-4 holds the first, never the second.
        assert (rollout.logp - behaviour)[mask].abs().max() < 1e-4, t
        if t >= 1:
            assert (rollout.logp - proximal)[mask].abs().max() > 0.1, t  # θ_t did not sample these rows
        assert losses[t]
        for indices, old_logp in losses[t]:
            m = mask[indices]
            wanted = rollout.logp[indices] if source == "rollout" else proximal[indices]
            assert torch.allclose(old_logp[m], wanted[m], atol=1e-4), (t, source)
        # mismatch/*: the proximal policy against the behaviour one (every row when recomputed; the
        # first mini-batch, the trainer's passes before any step, with the sampler's numbers; those
        # passes replay the behaviour policy's experts under Routing Replay, so not this plain pass).
        rows = torch.arange(mask.shape[0]) if source == "recompute" else \
            batch.order.chunk(cfg.trainer.num_minibatches)[0]
        gap = logp_mismatch(proximal[rows], rollout.logp[rows], rollout.response_mask[rows])
        if not (replay and source == "rollout"):
            # the trainer's passes against this full pass: measured 1e-7 apart, on gaps of 1e-7 (step 0) to 3
            assert metrics["mismatch/logp_abs_diff"] == pytest.approx(gap["mismatch/logp_abs_diff"].item(),
                                                                      rel=1e-4, abs=1e-6), t
        if t >= 1:
            assert metrics["mismatch/logp_abs_diff"] > 0.1
        if replay:  # π_old's experts forced: the sampler's (behaviour) routes that travelled with the
            # queued batch, or the proximal policy's from the recomputation
            assert replayed[t] and all(routes is not None for routes, _ in replayed[t])
            for routes, micro_rows in replayed[t]:
                assert all(torch.equal(got, want) for got, want in zip(routes, steps.gather_rows(
                    [batch.old], micro_rows).routes))
            if source == "rollout":
                assert batch.old.routes is rollout.routes is not None
    assert [r.get("rollout/policy_lag") for r in read_records(run_dir)] == [0.0, 1.0, 1.0, None]


def test_staleness_0_is_the_run_without_a_queue(tmp_path, cache_dir, monkeypatch):
    """k = 0: the queue passes each batch straight through, so the run logs exactly what the loop
    logs when it samples and trains with `steps.collect_rollout` itself (the same computation, in
    the same order of random draws: exact). The same run as before the queue existed was checked
    against main's code by hand (docs/testing.md)."""
    cfg = compose_train(overrides(cache_dir, 0, 2, "algo.old_logp=recompute", "algo.rollout_correction=tis-token"))
    loop.train(cfg, tmp_path / "queue")
    monkeypatch.setattr(RolloutQueue, "next_batch",
                        lambda self, policy, ctx, stream, step: steps.collect_rollout(policy, ctx, stream))
    loop.train(cfg, tmp_path / "direct")
    got, expected = read_records(tmp_path / "queue"), read_records(tmp_path / "direct")
    assert "rollout/policy_lag" not in got[0] and "mismatch/logp_abs_diff" in got[0]
    assert_records_close(got, expected, rel=0.0)


def test_the_same_seed_gives_the_same_run_with_staleness_2(tmp_path, cache_dir):
    """Two runs of k = 2 from one seed: one computation twice, so exactly the same records."""
    cfg = compose_train(overrides(cache_dir, 2, 3))
    loop.train(cfg, tmp_path / "a")
    loop.train(cfg, tmp_path / "b")
    first = read_records(tmp_path / "a")
    assert [r.get("rollout/policy_lag") for r in first] == [0.0, 1.0, 2.0, None]
    assert_records_close(read_records(tmp_path / "b"), first, rel=0.0)


@pytest.mark.parametrize("extra,warns", [
    (["algo.old_logp=recompute"], True),  # the proximal policy, nothing for the behaviour one
    (["algo.old_logp=recompute", "algo.rollout_correction=tis-token"], False),  # decoupled PPO
    (["algo.old_logp=rollout"], False),  # the behaviour policy
    (["hardware.precision=bf16"], True),  # auto recomputes under bf16
])
def test_a_stale_run_dividing_by_the_proximal_policy_with_no_correction_is_warned(cache_dir, extra, warns):
    stale = loop.config_pitfalls(compose_train(overrides(cache_dir, 2, 3, *extra)))
    assert any("trainer.staleness=2 with π_old recomputed and no algo.rollout_correction" in p
               for p in stale) == warns
    assert not any("trainer.staleness" in p for p in loop.config_pitfalls(compose_train(overrides(cache_dir, 0, 3,
                                                                                                  *extra))))


@pytest.fixture(scope="module")
def stale_run(tmp_path_factory, cache_dir):
    """A run of 4 steps with k = 2, checkpointed at step 2 (the queue then holds the batches θ_0
    and θ_1 sampled for steps 2 and 3)."""
    run_dir = tmp_path_factory.mktemp("stale") / "run"
    loop.train(compose_train(overrides(cache_dir, 2, 4, "trainer.save_every=2")), run_dir)
    return run_dir


def test_a_resume_with_staleness_2_continues_the_uninterrupted_run(stale_run, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(stale_run, run_dir)
    saved = load_trainer_state(run_dir / "checkpoints" / "step_2")
    assert [q["sampled_at"] for q in saved["rollouts"][0]] == [0, 1]
    straight = read_records(run_dir)
    loop.train(compose_train(overrides(cache_dir, 2, 4, "trainer.save_every=2", "resume=auto")), run_dir)
    # Exact: the resumed run gets weights, AdamW state, random states, prompt stream and queued
    # rollouts back bit for bit and runs the same kernels on the same CPU and threads (docs/testing.md).
    resumed = read_records(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert_records_close(resumed, straight, rel=0.0)


def test_a_resume_that_cannot_continue_the_queue_is_refused(stale_run, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(stale_run, run_dir)
    for k in (0, 1):
        with pytest.raises(ValueError, match=r"holds 2 queued rollout batch\(es\) per rank, but trainer.staleness="
                                             rf"{k} needs {k}: resume with the trainer.staleness"):
            loop.train(compose_train(overrides(cache_dir, k, 4, "resume=auto")), run_dir)
    checkpoint = run_dir / "checkpoints" / "step_2"
    state = load_trainer_state(checkpoint)
    torch.save({**state, "rollouts": state["rollouts"] * 2}, checkpoint / STATE_FILE)  # as if 2 ranks wrote it
    with pytest.raises(ValueError, match=r"queued rollouts of 2 rank\(s\), not 1: each rank trains on the rows"):
        loop.train(compose_train(overrides(cache_dir, 2, 4, "resume=auto")), run_dir)


@pytest.mark.slow  # two torchrun jobs of 2 processes: ~1.5 min on 2 shared cores
def test_two_fsdp_processes_each_resume_their_own_queue(tmp_path, cache_dir):
    """Each rank queues its own rows (its share of every batch's prompts): a checkpoint holds every
    rank's queue, and a resume gives each rank its own back, so the resumed run logs the
    uninterrupted one's figures."""
    import os
    import subprocess
    import sys

    def gspo_train(run_dir, *extra):
        done = subprocess.run(
            [sys.executable, "-m", "gspo_cli", "train", *overrides(cache_dir, 2, 4), "trainer.save_every=2",
             "trainer.eval_every=2", "hardware=cpu-2proc", "hardware.strategy=fsdp", f"hydra.run.dir={run_dir}",
             *extra], env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}, capture_output=True,
            text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    gspo_train(straight)
    saved = load_trainer_state(straight / "checkpoints" / "step_2")["rollouts"]
    assert [[q["sampled_at"] for q in rank] for rank in saved] == [[0, 1], [0, 1]]
    assert saved[0][0]["rollout"]["completions"] != saved[1][0]["rollout"]["completions"]  # each rank its own rows
    shutil.copytree(straight, resumed)
    assert "resumed from" in gspo_train(resumed, "resume=auto")
    # Separate processes, two ranks: equal to float rounding (measured: bit for bit on this machine);
    # rel 1e-5 as test_resume.py's two-process resume allows.
    expected, got = read_records(straight), read_records(resumed)
    assert [r.get("rollout/policy_lag") for r in got] == [0.0, 1.0, 2.0, 2.0, None]
    assert_records_close(got, expected, rel=1e-5, abs=1e-7)
