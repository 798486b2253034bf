"""The named steps of one RL step (`gspo_cli/train/steps.py`): π_old is one value, read by every update,
and an update moves each response's log-probability with its own advantage."""

import copy
import math

import pytest
import torch
from conftest import compose_train
from test_train import small_overrides

import gspo_cli.train.steps as steps
import gspo_cli.train.update as update
from gspo_cli.rollout.generate import generate_rollout
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.loop import make_context, setup


def test_complete_old_policy_puts_each_row_back_in_its_place():
    # Rows 2, 0 are known (logp 20, 0); the first mini-batch holds rows 3, 1 (logp 30, 10).
    known = steps.OldPolicy(torch.tensor([2, 0]), torch.tensor([[20.0], [0.0]]), [torch.tensor([[[2]], [[0]]])])
    first = steps.OldPolicy(torch.tensor([3, 1]), torch.tensor([[30.0], [10.0]]), [torch.tensor([[[3]], [[1]]])])
    old = steps.complete_old_policy([known, first], 4)
    assert old.logp.squeeze(1).tolist() == [0.0, 10.0, 20.0, 30.0]
    assert old.routes[0].flatten().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="each of the batch's 5 rows once"):
        steps.complete_old_policy([known, first], 5)


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
    seen, original_loss = [], update.minibatch_loss
    monkeypatch.setattr(update, "minibatch_loss", lambda logp, old_logp, b, idx, c, n: seen.append(
        (idx, old_logp.clone(), logp.detach())) or original_loss(logp, old_logp, b, idx, c, n))

    update.update_policy(policy, state.optimizer, state.scheduler, batch, ctx)

    assert len(seen) == 4
    mask = rollout.response_mask.bool()
    for indices, old_logp, _ in seen:
        assert torch.allclose(old_logp[mask[indices]], expected[indices][mask[indices]], atol=1e-5)
    # The policy did move: the last update's own log-probabilities are far from π_old's.
    indices, old_logp, logp = seen[-1]
    assert (logp - old_logp)[mask[indices]].abs().max() > 1e-3
    # The second epoch covers every row again, in another order.
    assert sorted(torch.cat([i for i, _, _ in seen[2:]]).tolist()) == list(range(batch.rewards.numel()))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_loss_and_gradient_of_one_pass(tmp_path, cache_dir, loss_agg):
    """trainer.micro_batch_size=3 on a mini-batch of 32 sequences (11 passes, the last of 2
    rows), and trainer.micro_batch_tokens=40 (rows sorted by length, each pass cut to its
    columns): the same loss and the same SGD step as one pass over the mini-batch."""
    import dataclasses

    cfg = compose_train(small_overrides(cache_dir) + [
        "trainer.num_minibatches=1", "algo.old_logp=rollout", f"algo.loss_agg={loss_agg}", "trainer.max_grad_norm=1e9"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    batch, _ = steps.collect_rollout(policy, ctx, state.stream)
    start = copy.deepcopy(policy.state_dict())

    def one_step(micro_batch_size, tokens=0):
        policy.load_state_dict(start)
        trainer = dataclasses.replace(cfg.trainer, micro_batch_size=micro_batch_size, micro_batch_tokens=tokens)
        sgd = torch.optim.SGD(policy.parameters(), lr=1.0)
        metrics = update.update_policy(policy, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda i: 1.0), batch,
                                       dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, trainer=trainer)))
        return metrics, {k: v.detach().clone() for k, v in policy.state_dict().items()}

    (whole, after_whole) = one_step(0)
    moved = [k for k in start if not torch.equal(start[k], after_whole[k])]
    assert moved  # the step did something
    # Rows of 3, and passes of at most 40 padded tokens, rows sorted by length (a budget of 3-4 rows).
    for micro, after_micro in (one_step(3), one_step(0, tokens=40)):
        # The loss is a sum of advantage-weighted terms that nearly cancel (group-centred advantages):
        # compare it at the scale of its terms; the gradients below are the exact check.
        assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-6)
        assert micro["clip/fraction"] == pytest.approx(whole["clip/fraction"], rel=1e-5, abs=1e-8)  # token-weighted
        for name in moved:  # lr 1: the change is the gradient
            delta_whole, delta_micro = after_whole[name] - start[name], after_micro[name] - start[name]
            assert torch.allclose(delta_micro, delta_whole, rtol=1e-4, atol=1e-7), name


def test_chunked_logprobs_equal_the_full_computation_without_full_logits(tiny_model):
    """chunk_tokens=9 over 3 rows × 8 response positions (3 positions per chunk): the same log-probabilities and gradients as
    the [n, T, V] path, and no [n, T, V] tensor is kept for the backward pass."""
    model, tokenizer = tiny_model
    rollout = generate_rollout(model, tokenizer, ["1+2=", "7+7=", "40+59="], 8, 1.0, torch.Generator().manual_seed(0))
    T, V = rollout.response_mask.shape[1], model.config.vocab_size

    def logprobs_grads_and_saved(chunk_tokens):
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, 0.7, chunk_tokens)
        (logp * rollout.response_mask).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters()], saved

    full, full_grads, full_saved = logprobs_grads_and_saved(0)
    chunked, chunked_grads, chunked_saved = logprobs_grads_and_saved(9)
    assert T == 8 and torch.allclose(chunked, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunked_grads, full_grads))
    # Tensors over the vocabulary kept for the backward pass: the full path keeps [n, T, V]
    # log-softmax outputs; the chunked one none (each chunk's are recomputed in the backward).
    over_vocab = lambda shapes: [s for s in shapes if s[-1] == V]  # noqa: E731
    assert any(s[1] == T for s in over_vocab(full_saved)) and not over_vocab(chunked_saved)


# ---------------------------------------------------------------------------- direction of the update


def sequence_logp(model, rollout) -> torch.Tensor:
    """Mean log-probability of each response's tokens under `model`: [N]."""
    mask = rollout.response_mask
    with torch.no_grad():
        logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, mask.shape[1])
    return (logp * mask).sum(1) / mask.sum(1)


def sgd_update(policy, batch, ctx, lr):
    """`update_policy` with plain SGD: the step is lr · (minus the gradient), nothing adaptive."""
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    return update.update_policy(policy, optimizer, scheduler, batch, ctx)


def assert_moved_with_the_advantages(rise: torch.Tensor, advantages: torch.Tensor) -> None:
    """Responses with A > 0 gained log-probability relative to those with A < 0.

    For one small step on −Σ_i A_i · logp_i the first-order change is Σ_i A_i Δ_i =
    lr · ‖Σ_i A_i ∇logp_i‖² ≥ 0 (Δ_i: the rise of response i's log-probability): a flipped
    sign, or advantages paired with the wrong responses, breaks it.
    """
    up, down = rise[advantages > 0], rise[advantages < 0]
    assert len(up) and len(down)
    assert up.mean() > down.mean(), (up.tolist(), down.tolist())
    assert (advantages * rise).sum() > 0


@pytest.mark.parametrize("algo", ["gspo", "grpo"])
def test_one_update_raises_the_responses_with_positive_advantage(algo, tiny_model, cache_dir):
    """One SGD step of the trainer's own `update_policy` on a fixed on-policy batch (ratio 1,
    nothing clipped): every other response gets A = +1, the others A = −1."""
    model, tokenizer = tiny_model
    prompts = [f"{a}+{a + 1}=" for a in range(4) for _ in range(4)]  # 4 groups of G = 4
    rollout = generate_rollout(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0))
    T, N = rollout.response_mask.shape[1], len(prompts)
    with torch.no_grad():
        old_logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T)
    rollout = rollout._replace(logp=old_logp)  # the sampler's numbers are π_old's (fp32)
    advantages = torch.tensor([1.0, -1.0] * (N // 2))
    batch = steps.Batch(rollout, advantages, advantages, rollout.entropy, torch.arange(N),
                        steps.OldPolicy(torch.arange(N), old_logp))
    cfg = compose_train(small_overrides(cache_dir, algo) + ["trainer.num_minibatches=1"])
    ctx = steps.StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator().manual_seed(0))
    before = sequence_logp(model, rollout)

    metrics = sgd_update(model, batch, ctx, lr=0.1)

    assert metrics["faults/skipped_steps"] == 0 and metrics["clip/fraction"] == 0  # on-policy: no clip
    rise = sequence_logp(model, rollout) - before
    assert_moved_with_the_advantages(rise, advantages)
    assert rise[advantages > 0].mean() > 0 > rise[advantages < 0].mean()  # up, and down, not only apart


def test_the_trainer_updates_each_response_with_its_own_reward(tmp_path, cache_dir):
    """`collect_rollout` then `update_policy`, as the loop runs them: each row's reward is that
    of its own completion and answer, its advantage that of its own reward, and the update
    makes the rewarded completions more likely."""
    from gspo_cli.algo.advantages import compute_advantages

    cfg = compose_train(small_overrides(cache_dir, "grpo") + ["trainer.num_minibatches=1"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    G = cfg.trainer.group_size
    problems = copy.deepcopy(state.stream).next_batch(cfg.trainer.prompts_per_step)  # the batch's prompts
    batch, timings = steps.collect_rollout(policy, ctx, state.stream)

    answers = [p.answer for p in problems for _ in range(G)]  # groups are contiguous
    rewards = torch.tensor([task.reward(c, a) for c, a in zip(batch.rollout.completions, answers)])
    torch.testing.assert_close(batch.rewards, rewards, rtol=0, atol=0)
    advantages = compute_advantages(rewards, G, cfg.algo.adv_baseline, cfg.algo.adv_scale)
    assert (advantages != 0).any()  # some group's rewards differ: there is a direction to check
    # the share of groups whose G rewards were all equal, counted here group by group
    uniform = sum(len(set(rewards[i:i + G].tolist())) == 1 for i in range(0, len(rewards), G)) / (len(rewards) // G)
    assert timings["reward/uniform_groups"] == pytest.approx(uniform)
    torch.testing.assert_close(batch.advantages, advantages, rtol=1e-6, atol=1e-6)

    before = sequence_logp(policy, batch.rollout)
    sgd_update(policy, batch, ctx, lr=0.01)
    assert_moved_with_the_advantages(sequence_logp(policy, batch.rollout) - before, advantages)


def test_mask_truncated_leaves_cut_off_responses_out_of_the_loss(tmp_path, cache_dir, monkeypatch):
    """algo.mask_truncated=true: the loss sees no token of a response still running at
    trainer.max_new_tokens (here 2 tokens: the tiny model's answers are longer), and the rows
    that ended keep all theirs."""
    import dataclasses

    cfg = compose_train(small_overrides(cache_dir) + ["algo.mask_truncated=true", "trainer.num_minibatches=1"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)  # warm start at 4 tokens
    # Rollouts of 2 tokens: one-digit answers end ("7" + EOS), two-digit ones are cut off.
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_new_tokens=2))
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    batch, _ = steps.collect_rollout(policy, ctx, state.stream)
    truncated = batch.rollout.truncated
    assert truncated.any() and not truncated.all()
    seen, original_loss = [], update.minibatch_loss
    monkeypatch.setattr(update, "minibatch_loss", lambda logp, old_logp, b, idx, c, n: seen.append(
        (idx, b.loss_tokens(idx), n)) or original_loss(logp, old_logp, b, idx, c, n))
    update.update_policy(policy, state.optimizer, state.scheduler, batch, ctx)
    (indices, mask, counts), = seen
    assert (mask[truncated[indices]] == 0).all()
    ended = ~truncated[indices]
    assert torch.equal(mask[ended], batch.rollout.response_mask[indices][ended])
    assert counts[0].item() == mask.sum().item()  # the loss is normalised by the kept tokens only


def test_kl_penalty_ignores_what_padding_and_masked_rows_hold(tiny_model, cache_dir):
    """With a KL reference, a NaN in log π_ref at padding and on a row the loss leaves out
    (`algo.mask_truncated`) must not reach the loss or its gradient (masking the result
    is not enough: the chain rule multiplies the mask's 0 by the NaN derivative)."""
    model, tokenizer = tiny_model
    prompts = [f"{a}+{a + 1}=" for a in range(2) for _ in range(2)]
    rollout = generate_rollout(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0))
    T, N = rollout.response_mask.shape[1], len(prompts)
    logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T)
    loss_mask = rollout.response_mask.clone()
    loss_mask[0] = 0  # a cut-off response, left out of the loss
    ref_logp = torch.where(loss_mask.bool(), logp.detach() - 0.1, float("nan"))
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch = steps.Batch(rollout, advantages, advantages, rollout.entropy, torch.arange(N),
                        steps.OldPolicy(torch.arange(N), logp.detach()), ref_logp, loss_mask)
    cfg = compose_train(small_overrides(cache_dir) + ["algo.kl_coef=0.1"])
    ctx = steps.StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator().manual_seed(0))
    counts = torch.tensor([loss_mask.sum().item(), float(N)])

    loss, metrics = update.minibatch_loss(logp, logp.detach(), batch, torch.arange(N), ctx, counts)
    loss.backward()

    assert torch.isfinite(metrics["kl/ref"]) and metrics["kl/ref"] > 0  # the real tokens' KL is counted
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_on_policy_recompute_completes_pi_old_from_the_only_mini_batch_and_frees_the_gradients(tmp_path, cache_dir):
    """trainer.num_minibatches=1 with algo.old_logp=recompute (fully on-policy, what `auto` picks
    under bf16): no π_old pass before the update, the one mini-batch's passes are π_old (ratio 1,
    nothing clipped), every row is compared with the sampler, and no gradient outlives the update."""
    cfg = compose_train(small_overrides(cache_dir) + ["trainer.num_minibatches=1", "algo.old_logp=recompute"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    batch, _ = steps.collect_rollout(policy, ctx, state.stream)
    assert batch.old.rows.numel() == 0  # nothing recomputed ahead of the update

    metrics = update.update_policy(policy, state.optimizer, state.scheduler, batch, ctx)

    assert metrics["faults/skipped_steps"] == 0 and metrics["clip/fraction"] == 0
    assert metrics["mismatch/logp_abs_diff"] < 1e-4 and math.isfinite(metrics["loss"])
    assert all(p.grad is None for p in policy.parameters())


def truncation_batch(model, tokenizer, masked_rows):
    """8 on-policy responses (2 groups of 4, advantages ±1) whose `masked_rows` are cut off and
    left out of the loss (`algo.mask_truncated`), in mini-batches of 4: rows 0-3, then 4-7."""
    prompts = [f"{a}+{a + 1}=" for a in range(2) for _ in range(4)]
    rollout = generate_rollout(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0))
    T, N = rollout.response_mask.shape[1], len(prompts)
    with torch.no_grad():
        old_logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T)
    rollout = rollout._replace(logp=old_logp)
    advantages = torch.tensor([1.0, -1.0] * (N // 2))
    loss_mask = rollout.response_mask.clone()
    loss_mask[masked_rows] = 0
    return steps.Batch(rollout, advantages, advantages, rollout.entropy, torch.arange(N),
                       steps.OldPolicy(torch.arange(N), old_logp), loss_mask=loss_mask)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_a_mini_batch_with_every_response_cut_off_is_skipped_cleanly(loss_agg, tiny_model, cache_dir):
    """Every row of the first mini-batch cut off and masked: no 0/0 (a NaN counted as a fault,
    which repeated stops the run), no optimizer step for it, the second mini-batch still learns."""
    model, tokenizer = tiny_model
    batch = truncation_batch(model, tokenizer, masked_rows=[0, 1, 2, 3])
    cfg = compose_train(small_overrides(cache_dir) + ["trainer.num_minibatches=2", "algo.mask_truncated=true",
                                                      f"algo.loss_agg={loss_agg}"])
    ctx = steps.StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    metrics = sgd_update(model, batch, ctx, lr=0.1)

    assert metrics["faults/skipped_steps"] == 0 and metrics["update/empty_minibatches"] == 1
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fully_masked_row_does_not_count_in_the_sequence_mean(tiny_model, cache_dir):
    """seq-mean-token-mean: a response cut off and masked entirely is not one of the sequences
    the loss averages over, so the update equals the update of the batch without that row
    (counting it shrank every other row's weight by 3/4 here)."""
    model, tokenizer = tiny_model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = compose_train(small_overrides(cache_dir) + ["trainer.num_minibatches=1", "algo.mask_truncated=true",
                                                      "trainer.max_grad_norm=1e9"])
    ctx = steps.StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator().manual_seed(0))
    with_row = truncation_batch(model, tokenizer, masked_rows=[0, 4])  # one of each group's 4

    def step(batch):
        model.load_state_dict(start)
        metrics = sgd_update(model, batch, ctx, lr=1.0)
        return metrics, {k: v.clone() for k, v in model.state_dict().items()}

    kept = torch.tensor([1, 2, 3, 5, 6, 7])
    r = with_row.rollout
    without = steps.Batch(r._replace(input_ids=r.input_ids[kept], attention_mask=r.attention_mask[kept],
                                     response_mask=r.response_mask[kept], logp=r.logp[kept], entropy=r.entropy[kept],
                                     completions=[r.completions[i] for i in kept]),
                          with_row.rewards[kept], with_row.advantages[kept], with_row.entropy[kept], torch.arange(6),
                          steps.OldPolicy(torch.arange(6), with_row.old.logp[kept]), loss_mask=with_row.loss_mask[kept])
    (m_with, after_with), (m_without, after_without) = step(with_row), step(without)
    assert m_with["loss"] == pytest.approx(m_without["loss"], rel=1e-5, abs=1e-7)
    moved = [k for k in start if not torch.equal(start[k], after_without[k])]
    assert moved
    for name in moved:
        torch.testing.assert_close(after_with[name] - start[name], after_without[name] - start[name],
                                   rtol=1e-4, atol=1e-7)
