"""Sampling and scoring agree: π_old recomputed for the update matches the sampler."""

import torch

from gspo_cli.rollout.generate import encode_prompts, generate_rollout, sample_with_logprobs
from gspo_cli.rollout.scoring import positions_from_mask, response_logprobs


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_left_padding_does_not_change_log_probs(tiny_model):
    model, tokenizer = tiny_model
    short, long = "1+2=", "12+34="
    alone = generate_rollout(model, tokenizer, [short], 4, temperature=0.0)
    batched = generate_rollout(model, tokenizer, [short, long], 4, temperature=0.0)
    assert alone.completions[0] == batched.completions[0]
    T = alone.response_mask.shape[1]
    logp_alone = response_logprobs(model, alone.input_ids, alone.attention_mask, T)
    logp_batched = response_logprobs(model, batched.input_ids[:1, : batched.input_ids.shape[1] - (batched.response_mask.shape[1] - T)],
                                        batched.attention_mask[:1, : batched.input_ids.shape[1] - (batched.response_mask.shape[1] - T)], T)
    assert torch.allclose(logp_alone, logp_batched, atol=1e-5)


def test_scoring_matches_the_sampler(tiny_model):
    """Greedy decoding picks the argmax, so every scored token must be the most likely one,
    and the cached step-by-step logits must equal one full forward pass."""
    model, tokenizer = tiny_model
    ids, mask = encode_prompts(tokenizer, ["1+2=", "40+59=", "7+7="], "cpu")
    response, response_mask, _, _ = sample_with_logprobs(model, ids, mask, 6, tokenizer.eos_token_id,
                                                       tokenizer.pad_token_id, temperature=0.0)
    full_ids = torch.cat([ids, response], 1)
    full_mask = torch.cat([mask, response_mask.long()], 1)
    logp = response_logprobs(model, full_ids, full_mask, response.shape[1])
    out = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions_from_mask(full_mask))
    best = out.logits[:, -response.shape[1] - 1:-1].log_softmax(-1).max(-1).values
    assert torch.allclose((logp * response_mask), (best * response_mask), atol=1e-5)


def test_sampling_is_reproducible_and_stops_at_eos(tiny_model):
    model, tokenizer = tiny_model
    prompts = ["3+4="] * 16
    a = generate_rollout(model, tokenizer, prompts, 8, 1.0, torch.Generator().manual_seed(1))
    b = generate_rollout(model, tokenizer, prompts, 8, 1.0, torch.Generator().manual_seed(1))
    assert a.completions == b.completions
    assert torch.equal(a.input_ids, b.input_ids)
    # Once a sequence has ended, its mask stays 0.
    m = a.response_mask
    assert torch.all(m[:, 1:] <= m[:, :-1])
    ended = (a.input_ids[:, -m.shape[1]:] == tokenizer.eos_token_id) & m.bool()
    assert torch.all(ended.sum(1) <= 1)
