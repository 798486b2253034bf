"""The named steps of one RL step (`gspo_cli/train/steps.py`): π_old is one value, read by every update."""

import copy

import pytest
import torch
from conftest import compose_train
from test_train import small_overrides

import gspo_cli.train.steps as steps
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.loop import make_context, setup


def test_complete_old_policy_puts_each_row_back_in_its_place():
    # Rows 2, 0 are known (logp 20, 0); the first mini-batch holds rows 3, 1 (logp 30, 10).
    known = steps.OldPolicy(torch.tensor([2, 0]), torch.tensor([[20.0], [0.0]]), [torch.tensor([[[2]], [[0]]])])
    first = steps.OldPolicy(torch.tensor([3, 1]), torch.tensor([[30.0], [10.0]]), [torch.tensor([[[3]], [[1]]])])
    old = steps.complete_old_policy(known, first, 4)
    assert old.logp.squeeze(1).tolist() == [0.0, 10.0, 20.0, 30.0]
    assert old.routes[0].flatten().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="each of the batch's 5 rows once"):
        steps.complete_old_policy(known, first, 5)


@pytest.mark.parametrize("source", ["recompute", "rollout"])
def test_every_epoch_divides_by_the_rollout_policy(tmp_path, cache_dir, monkeypatch, source):
    """trainer.ppo_epochs=2: all four updates (2 epochs × 2 mini-batches) use log π_old of the
    policy that sampled the batch, although the policy has moved after the first."""
    cfg = compose_train(small_overrides(cache_dir) + [
        "trainer.ppo_epochs=2", "trainer.num_minibatches=2", f"algo.old_logp={source}", "trainer.lr=3e-2"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    batch, _ = steps.collect_rollout(policy, ctx, state.stream)
    rollout, T = batch.rollout, batch.rollout.response_mask.shape[1]
    rollout_policy = copy.deepcopy(policy).eval()
    with torch.no_grad():
        expected = response_logprobs(rollout_policy, rollout.input_ids, rollout.attention_mask, T, cfg.trainer.temperature)
    seen, original_loss = [], steps.minibatch_loss
    monkeypatch.setattr(steps, "minibatch_loss", lambda logp, old, b, idx, c: seen.append(
        (idx, old.logp[idx].clone(), logp.detach())) or original_loss(logp, old, b, idx, c))

    steps.update_policy(policy, state.optimizer, state.scheduler, batch, ctx)

    assert len(seen) == 4
    mask = rollout.response_mask.bool()
    for indices, old_logp, _ in seen:
        assert torch.allclose(old_logp[mask[indices]], expected[indices][mask[indices]], atol=1e-5)
    # The policy did move: the last update's own log-probabilities are far from π_old's.
    indices, old_logp, logp = seen[-1]
    assert (logp - old_logp)[mask[indices]].abs().max() > 1e-3
    # The second epoch covers every row again, in another order.
    assert sorted(torch.cat([i for i, _, _ in seen[2:]]).tolist()) == list(range(batch.rewards.numel()))
