"""Sampling and scoring agree: π_old recomputed for the update matches the sampler; responses end
at every stop token and stop string (also when the pad token is the EOS), masks and truncation
flags are right; top-p/top-k report the distribution they sample from."""

from types import SimpleNamespace

import pytest
import torch
from test_perf import common_token

from gspo_cli.models.build import build_char_tokenizer
from gspo_cli.models.loading import load_tokenizer
from gspo_cli.rollout.generate import (
    encode_prompts,
    filter_logits,
    generate_rollout,
    sample_with_logprobs,
    stop_token_ids,
)
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
    response, response_mask, *_ = sample_with_logprobs(model, ids, mask, 6, tokenizer.eos_token_id,
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
    sampled = sample_with_logprobs(model, ids, mask, 8, eos, pad, TEMPERATURE, torch.Generator().manual_seed(1))
    return ids, mask, eos, sampled[:4]


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


# ---------------------------------------------------------------------------- stop tokens, truncation


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy choice is scripted: row i's t-th response token is
    scripts[i][t] (its last token once the script runs out). Its generation config lists
    `eos_token_id` (an int, a list, or None) as a checkpoint's generation_config.json does."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, eos_token_id=None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the device
        self.scripts, self.vocab_size, self.step = scripts, vocab_size, 0
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)

    def forward(self, input_ids, past_key_values=None, **kwargs):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        for row, script in enumerate(self.scripts):
            logits[row, -1, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return SimpleNamespace(logits=logits)


def char_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_end_token_of_the_generation_config_ends_a_response():
    # Qwen3's generation_config.json lists [<|im_end|>, <|endoftext|>]; here "!" plays <|im_end|>.
    tokenizer = build_char_tokenizer()
    eos, bang = tokenizer.eos_token_id, char_ids(tokenizer, "!")[0]
    scripts = [char_ids(tokenizer, "12!34"), char_ids(tokenizer, "7") + [eos] + char_ids(tokenizer, "99"),
               char_ids(tokenizer, "abcde")]
    for configured in ([bang, eos], [bang], bang):  # a list or an int; the tokenizer's eos always counts
        model = ScriptedLM(scripts, len(tokenizer), eos_token_id=configured)
        rollout = generate_rollout(model, tokenizer, ["1+1=", "3+4=", "0+0="], 5, temperature=0.0)
        assert rollout.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], configured
        assert rollout.completions == ["12!", "7", "abcde"]
        assert rollout.truncated.tolist() == [False, False, True]
    assert stop_token_ids(ScriptedLM(scripts, len(tokenizer)), tokenizer) == [eos]  # no generation config entry


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad!=eos", "pad==eos"])
def test_the_end_token_is_in_the_mask_and_the_padding_after_it_is_not(pad_is_eos):
    tokenizer = build_char_tokenizer()
    if pad_is_eos:  # as in Qwen3 Base checkpoints: <|endoftext|> is both
        tokenizer.pad_token = tokenizer.eos_token
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (eos == pad) is pad_is_eos
    five, digits = char_ids(tokenizer, "5"), char_ids(tokenizer, "1234")
    scripts = [five + [eos] + digits, [eos] + digits, digits, digits[:3] + [eos]]
    model = ScriptedLM(scripts, len(tokenizer))
    rollout = generate_rollout(model, tokenizer, ["1+4=", "0+0=", "99+99=", "1+2="], 4, temperature=0.0)
    response = rollout.input_ids[:, -4:]
    assert response.tolist() == [five + [eos, pad, pad], [eos, pad, pad, pad], digits, digits[:3] + [eos]]
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(rollout.attention_mask[:, -4:], rollout.response_mask.long())
    assert rollout.completions == ["5", "", "1234", "123"]
    # Cut at max_new_tokens: only the row still running; the last row ended on its last token.
    assert rollout.truncated.tolist() == [False, False, True, False]


def test_stop_strings_end_a_response_and_stay_in_it():
    tokenizer = build_char_tokenizer()
    texts = ["7\n\nmore", "ab END cd", "no stop here", "ENDING"]
    model = ScriptedLM([char_ids(tokenizer, t) for t in texts], len(tokenizer))
    rollout = generate_rollout(model, tokenizer, ["q"] * 4, 12, temperature=0.0, stop_strings=["\n\n", "END"])
    assert rollout.completions == ["7\n\n", "ab END", "no stop here", "END"]
    assert rollout.response_mask.sum(1).tolist() == [3, 6, 12, 3]
    assert rollout.truncated.tolist() == [False, False, True, False]


def test_a_special_token_works_as_a_stop_string(real_base_dir):
    # A Base checkpoint's generation config may list <|endoftext|> only; `trainer.stop_strings`
    # can still end chat turns at <|im_end|>, which the completion text itself leaves out.
    tokenizer = load_tokenizer(real_base_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seven = char_ids(tokenizer, "7")
    model = ScriptedLM([seven + [im_end] + seven * 3], len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    plain = generate_rollout(model, tokenizer, ["3+4="], 6, temperature=0.0)
    assert plain.truncated.tolist() == [True]  # <|im_end|> is no stop token of this model
    for stop in ("<|im_end|>", "7<|im_end|>"):  # a whole special token (matched by id), or text around one
        model.step = 0
        rollout = generate_rollout(model, tokenizer, ["3+4="], 6, temperature=0.0, stop_strings=[stop])
        assert rollout.input_ids[0, -2:].tolist() == seven + [im_end], stop
        assert rollout.completions == ["7"] and rollout.truncated.tolist() == [False], stop


# ---------------------------------------------------------------------------- top-p, top-k


def test_filter_logits_keeps_what_transformers_warpers_keep():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    # Hand case, probabilities 0.5, 0.3, 0.15, 0.05: the nucleus of 0.75 needs the first two
    # (0.5 < 0.75 ≤ 0.8), of 0.85 the first three; top-k 1 is the argmax.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_p=0.75) == [True, True, False, False]
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_k=1) == [True, False, False, False]
    assert kept(top_k=3, top_p=0.4) == [True, False, False, False]
    assert kept(top_k=0, top_p=1.0) == [True] * 4
    random = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in ((5, 1.0), (0, 0.9), (0, 0.3), (10, 0.8)):
        ours = filter_logits(random, top_k, top_p)
        theirs = random
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), (top_k, top_p)


class FixedLM(torch.nn.Module):
    """Every row's next-token logits are `logits` [V] at every step."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, past_key_values=None, **kwargs):
        return SimpleNamespace(logits=self.logits.detach().expand(input_ids.shape[0], input_ids.shape[1], -1))


@pytest.mark.parametrize("top_k,top_p,kept", [(2, 1.0, 2), (0, 0.75, 2), (0, 0.85, 3), (3, 0.4, 1)])
def test_top_k_and_top_p_sample_from_and_report_the_truncated_distribution(top_k, top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    model, N = FixedLM(probs.log()), 4000
    ids, mask = torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1, dtype=torch.long)
    sampled = sample_with_logprobs(model, ids, mask, 1, eos_token_id=99, pad_token_id=98, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0), top_p=top_p, top_k=top_k)
    tokens = sampled.tokens[:, 0]
    renormalised = probs[:kept] / probs[:kept].sum()  # e.g. top-2: 0.5/0.8, 0.3/0.8
    assert tokens.max() < kept  # nothing outside the kept set is drawn
    # The reported log-probability is the renormalised one, not log π(y) of the full distribution.
    assert torch.allclose(sampled.logp[:, 0], renormalised.log()[tokens], atol=1e-6)
    assert torch.allclose(sampled.entropy[:, 0], -(renormalised * renormalised.log()).sum().expand(N), atol=1e-6)
    frequencies = torch.bincount(tokens, minlength=kept)[:kept].float() / N
    assert torch.allclose(frequencies, renormalised, atol=0.03)
