"""The faster paths give the numbers of the straightforward ones (issue 9, item 5).

Each optimisation is compared with a plain reference written here: the sampler against a
KV-cache loop that feeds every row at every step, the chunked π_old against one forward
pass over the whole batch, the single log-softmax against `F.cross_entropy`.
"""

import torch
import torch.nn.functional as F
from conftest import compose_train
from test_train import small_overrides
from transformers import DynamicCache

from gspo_cli.models.routing import MoERouting, routes_by_sequence
from gspo_cli.rollout.generate import (
    _cache_kwarg,
    encode_prompts,
    generate_rollout,
    sample_from_probs,
    sample_with_logprobs,
)
from gspo_cli.rollout.scoring import positions_from_mask, response_logprobs
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.loop import setup
from gspo_cli.train.steps import StepContext, old_logprobs


@torch.no_grad()
def reference_sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                     generator):
    """Token by token with transformers' own growing KV cache, every row in every forward pass,
    for all max_new_tokens."""
    cache = {_cache_kwarg(type(model)): DynamicCache()}
    mask, positions = prompt_mask, positions_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    tokens, alive, logps = [], [], []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        scaled = logits / temperature if temperature > 0 else logits
        log_probs = torch.log_softmax(scaled, -1)
        token = sample_from_probs(torch.softmax(scaled, -1), generator) if temperature > 0 else logits.argmax(-1)
        logps.append(log_probs.gather(1, token[:, None]).squeeze(1))
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        alive.append(~finished)
        finished = finished | (token == eos_token_id)
        mask = torch.cat([mask, (~finished).long()[:, None]], 1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **cache)
    return torch.stack(tokens, 1), torch.stack(alive, 1).float(), torch.stack(logps, 1)


def common_token(model, prompt_ids, prompt_mask) -> int:
    """The token the model most often puts first: used as end-of-sequence, many rows end early."""
    with torch.no_grad():
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                       position_ids=positions_from_mask(prompt_mask)).logits[:, -1]
    return int(logits.argmax(-1).mode().values)


def test_sampler_matches_the_reference_token_for_token(tiny_model):
    model, tokenizer = tiny_model
    ids, mask = encode_prompts(tokenizer, [f"{a}+{b}=" for a in range(8) for b in range(4)], "cpu")  # N = 32
    eos = common_token(model, ids, mask)
    forwards = []  # the sampler's forward passes
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: forwards.append(1), with_kwargs=True)
    for temperature in (1.0, 0.1, 0.0):  # at 0.1 about half the rows end after one token
        forwards.clear()
        ref = reference_sample(model, ids, mask, 6, eos, tokenizer.pad_token_id, temperature,
                               torch.Generator().manual_seed(5))
        forwards.clear()
        new = sample_with_logprobs(model, ids, mask, 6, eos, tokenizer.pad_token_id, temperature,
                                   torch.Generator().manual_seed(5))
        T = new[0].shape[1]
        # Same tokens and mask (the reference runs all 6 steps; the sampler may stop once all ended).
        # Integers, compared exactly: logits that differ in the last bit change a draw only when
        # the uniform falls within that bit of a boundary of the running sum.
        assert torch.equal(new[0], ref[0][:, :T]) and torch.equal(new[1], ref[1][:, :T])
        assert ref[1][:, T:].sum() == 0
        m = new[1]
        # Log-probabilities to float rounding, not bit for bit: the two loops attend over the same
        # keys held in differently laid-out caches (views of preallocated buffers against grown
        # tensors), and the kernels may sum those in another order on another CPU or torch.
        torch.testing.assert_close(new[2][m.bool()], ref[2][:, :T][m.bool()], rtol=1e-6, atol=1e-6)
        # One prefill and one pass per token but the last (T = 6 at temperature 1: 6, not 7).
        assert len(forwards) == T
    hook.remove()


def test_entropy_of_the_sampler_is_that_of_its_distribution(tiny_model):
    model, tokenizer = tiny_model
    ids, mask = encode_prompts(tokenizer, ["1+2=", "40+59="], "cpu")
    _, m, _, entropy, _ = sample_with_logprobs(model, ids, mask, 1, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                            0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
    p = torch.softmax(logits / 0.5, -1)  # H = -Σ p log p of the tempered first-token distribution
    assert torch.allclose(entropy[:, 0], -(p * p.log()).sum(-1), atol=1e-5)


def test_one_log_softmax_gives_cross_entropy_values_and_gradient(tiny_model):
    model, tokenizer = tiny_model
    rollout = generate_rollout(model, tokenizer, ["1+2=", "7+7=", "40+59="], 4, 1.0, torch.Generator().manual_seed(0))
    T = rollout.response_mask.shape[1]
    logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, 0.7)
    logp.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # Reference: F.cross_entropy of the tempered logits, entropy from its own log-softmax.
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=positions_from_mask(rollout.attention_mask)).logits[:, -T - 1:-1] / 0.7
    ref = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rollout.input_ids[:, -T:].reshape(-1),
                           reduction="none").view(-1, T)
    ref.sum().backward()
    assert torch.allclose(logp, ref, atol=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))


def test_old_logp_by_minibatch_equals_one_forward_pass_and_leaves_out_the_first(tiny_model, cache_dir):
    model, tokenizer = tiny_model
    model.eval()
    cfg = compose_train(small_overrides(cache_dir) + ["trainer.num_minibatches=4"])
    routing = MoERouting(model)
    ctx = StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator(), routing)
    prompts = [f"{a}+{a}=" for a in range(12)]  # N = 12: 4 mini-batches of 3 rows
    rollout = generate_rollout(model, tokenizer, prompts, 4, 1.0, torch.Generator().manual_seed(0))
    T = rollout.response_mask.shape[1]
    minibatches = torch.randperm(12, generator=torch.Generator().manual_seed(0)).chunk(4)
    old = old_logprobs(model, rollout, ctx, minibatches[1:])  # 3 forward passes
    with torch.no_grad(), routing.capture() as whole_routes:
        ref_logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T)
    whole = routes_by_sequence(list(whole_routes), 12)  # per layer [N, L, k]
    done = torch.cat(minibatches[1:])  # the first mini-batch's own forward pass will give its π_old
    assert torch.equal(old.rows, done) and old.logp.shape == (9, T)
    assert torch.allclose(old.logp, ref_logp[done], atol=1e-6)
    assert len(old.routes) == len(whole) and all(torch.equal(a, b[done]) for a, b in zip(old.routes, whole))
    routing.remove()


def test_reference_logp_by_micro_batch_equals_one_forward_pass_over_every_row(tiny_model, cache_dir):
    """log π_ref is computed a micro-batch at a time (memory), and no row is left out."""
    from gspo_cli.train.steps import reference_logprobs

    model, tokenizer = tiny_model
    cfg = compose_train(small_overrides(cache_dir) + ["trainer.micro_batch_size=4", "trainer.temperature=0.7"])
    ctx = StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator())
    model.eval()
    prompts = [f"{a}*{a}=" for a in range(10)]
    rollout = generate_rollout(model, tokenizer, prompts, 4, 1.0, torch.Generator().manual_seed(1))
    T = rollout.response_mask.shape[1]
    passes = []
    hook = model.register_forward_hook(lambda module, args, out: passes.append(out.logits.shape[0]))
    logp = reference_logprobs(model, rollout, ctx)  # micro-batches of 4, 4, 2 rows
    hook.remove()
    with torch.no_grad():
        whole = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, 0.7)
    assert passes == [4, 4, 2]
    assert torch.allclose(logp, whole, atol=1e-6)


def test_first_minibatch_gives_pi_old_so_recompute_runs_one_pass_fewer(tmp_path, cache_dir, monkeypatch):
    """algo.old_logp=recompute with 2 mini-batches: one π_old pass (the second mini-batch),
    the first mini-batch's ratio is exactly 1, and every row ends with a finite π_old."""
    import gspo_cli.train.passes as passes_module
    import gspo_cli.train.steps as steps
    import gspo_cli.train.update as update
    from gspo_cli.train.loop import make_context

    cfg = compose_train(small_overrides(cache_dir) + ["algo.old_logp=recompute", "trainer.num_minibatches=2"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    passes = []
    original = passes_module.response_logprobs
    monkeypatch.setattr(passes_module, "response_logprobs", lambda *a, **k: passes.append(torch.is_grad_enabled())
                        or original(*a, **k))
    batch, _ = steps.collect_rollout(policy, ctx, state.stream)
    assert passes == [False]  # π_old of the second mini-batch only
    assert torch.equal(batch.old.rows, batch.order.chunk(2)[1])  # the first mini-batch is left out
    ratios, completed = [], []
    original_loss, original_complete = update.minibatch_loss, update.complete_old_policy
    monkeypatch.setattr(update, "minibatch_loss", lambda logp, old_logp, b, idx, c, n: ratios.append(
        torch.exp(logp.detach() - old_logp)) or original_loss(logp, old_logp, b, idx, c, n))
    monkeypatch.setattr(update, "complete_old_policy", lambda parts, n: completed.append(
        original_complete(parts, n)) or completed[-1])
    metrics = update.update_policy(policy, state.optimizer, state.scheduler, batch, ctx)
    # Exactly 1 by construction: π_old of the first mini-batch is this very pass's output, detached.
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    assert len(completed) == 1 and torch.equal(completed[0].rows, torch.arange(batch.rewards.numel()))
    assert torch.isfinite(completed[0].logp).all()
    assert metrics["mismatch/logp_abs_diff"] < 1e-4  # every row's trainer π_old against the sampler's
    assert len(ratios) == 2 and not torch.equal(ratios[1], torch.ones_like(ratios[1]))  # after a step


def test_fused_adamw_is_the_default_and_can_be_turned_off(tmp_path, cache_dir):
    for override, fused in (([], True), (["hardware.fused_adamw=false"], False)):
        cfg = compose_train(small_overrides(cache_dir) + override)
        _, _, _, state = setup(cfg, tmp_path / str(fused), DistEnv(), print)
        assert state.optimizer.defaults["fused"] is fused


def test_inverse_cdf_sampling_draws_from_the_distribution():
    """Frequencies of 200k draws match the probabilities (chi-square), zero-probability
    tokens are never drawn, and a one-hot row always gives its token."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    draws = 40_000
    tokens = sample_from_probs(probs.repeat_interleave(draws, 0), torch.Generator().manual_seed(0)).view(3, draws)
    counts = F.one_hot(tokens, 5).sum(1).float()  # [3, V]
    assert counts[0, 1] == 0 and counts[0, 4] == 0
    assert (tokens[1] == 4).all()
    for row in (0, 2):
        support = probs[row] > 0
        expected = probs[row][support] * draws
        chi2 = ((counts[row][support] - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.0, chi2  # 4 or 3 degrees of freedom: p < 0.001 above ~18.5
    # The same generator seed gives the same tokens; a different seed, different ones.
    again = sample_from_probs(probs.repeat_interleave(draws, 0), torch.Generator().manual_seed(0)).view(3, draws)
    other = sample_from_probs(probs.repeat_interleave(draws, 0), torch.Generator().manual_seed(1)).view(3, draws)
    assert torch.equal(tokens, again) and not torch.equal(tokens[0], other[0])
