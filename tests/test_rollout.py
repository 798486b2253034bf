"""Sampling and scoring agree: π_old recomputed for the update matches the sampler; responses stop at
their EOS, also when the pad token is the EOS."""

import torch
from test_perf import common_token

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


# Low enough that the most likely first token is drawn often: 8 of the 32 rows end early.
TEMPERATURE = 0.2


def sample_ending_early(model, tokenizer, pad_token_id=None):
    """32 prompts sampled with, as end-of-sequence, the token the untrained model most often
    puts first (it practically never samples its real EOS): some rows end early, others run
    to the limit.

    Returns (prompt ids, prompt mask, eos, (response ids, response mask, logp, entropy)).
    """
    ids, mask = encode_prompts(tokenizer, [f"{a}+{b}=" for a in range(8) for b in range(4)], "cpu")
    eos = common_token(model, ids, mask)
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    ids = torch.where(mask.bool(), ids, pad)  # the prompts' left padding is the pad token too
    return ids, mask, eos, sample_with_logprobs(model, ids, mask, 8, eos, pad, TEMPERATURE,
                                                torch.Generator().manual_seed(1))


def first_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Position of each row's first EOS token, T for rows without one: [N]."""
    is_eos = tokens == eos
    return torch.where(is_eos.any(1), is_eos.float().argmax(1), tokens.shape[1])


def test_sampling_is_reproducible_and_stops_at_eos(tiny_model):
    model, tokenizer = tiny_model
    _, _, eos, (tokens, mask, _, _) = sample_ending_early(model, tokenizer)
    _, _, _, (again, again_mask, _, _) = sample_ending_early(model, tokenizer)
    assert torch.equal(tokens, again) and torch.equal(mask, again_mask)
    end = first_eos(tokens, eos)
    T = tokens.shape[1]
    assert (end < T - 1).any() and (end == T).any()  # rows that end early and rows that never end
    after = torch.arange(T)[None] > end[:, None]  # [N, T] positions after a row's first EOS
    # The response mask covers every token up to and including the first EOS, none after it,
    # and the positions after it hold padding, not further samples.
    assert torch.equal(mask, (~after).float())
    assert (tokens[after] == tokenizer.pad_token_id).all()


def test_pad_token_equal_to_eos_changes_nothing_but_the_padding(tiny_model):
    """Tokenizers without a pad token get pad = eos (`load_tokenizer`): the EOS that ends a
    response must stay in the mask although its id is the padding's, and sampling and
    scoring must give what they give with a separate pad token."""
    model, tokenizer = tiny_model
    _, _, eos, (tokens, mask, logp, _) = sample_ending_early(model, tokenizer)
    ids, prompt_mask, _, (same_tokens, same_mask, same_logp, _) = sample_ending_early(model, tokenizer, eos)
    assert eos != tokenizer.pad_token_id and (first_eos(tokens, eos) < tokens.shape[1] - 1).any()
    real = mask.bool()
    assert (~real).any()  # there is padding after an EOS to tell apart
    assert torch.equal(same_mask, mask)  # the EOS counted, the padding after it not
    assert torch.equal(same_tokens[real], tokens[real]) and (same_tokens[~real] == eos).all()
    # Rows are independent and masked positions carry no weight: the same numbers to rounding.
    torch.testing.assert_close(same_logp[real], logp[real], rtol=1e-6, atol=1e-6)
    # Scoring the pad = eos batch gives the sampler's log-probabilities of the real tokens.
    scored = response_logprobs(model, torch.cat([ids, same_tokens], 1), torch.cat([prompt_mask, same_mask.long()], 1),
                               same_tokens.shape[1], TEMPERATURE)
    torch.testing.assert_close(scored[real], same_logp[real], rtol=1e-5, atol=1e-5)
