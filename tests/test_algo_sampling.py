"""DAPO's dynamic sampling and overlong penalty on hand-made rollout batches."""

import pytest
import torch

from gspo_cli.algo.batch_shaping import informative_groups, overlong_penalty
from gspo_cli.rollout.batching import concat_rollouts, rollout_rows
from gspo_cli.rollout.generate import Rollout
from gspo_cli.rollout.refill import fill_with_informative_groups

PAD = 0


def make_rollout(tag: int, n: int, P: int, T: int) -> Rollout:
    """n sequences whose prompt tokens all equal `tag` and response tokens `tag + 100 + row`."""
    prompt = torch.full((n, P), tag)
    response = (tag + 100 + torch.arange(n))[:, None].expand(n, T)
    return Rollout(
        input_ids=torch.cat([prompt, response], 1), attention_mask=torch.ones(n, P + T, dtype=torch.long),
        response_mask=torch.ones(n, T), completions=[f"{tag}-{i}" for i in range(n)],
        logp=torch.full((n, T), -float(tag)), entropy=torch.ones(n, T),
        routes=[torch.full((n, P + T, 2), tag)],  # one MoE layer, top-2
        truncated=torch.arange(n) % 2 == tag % 2)  # every other row cut at max_new_tokens


def test_informative_groups():
    # G = 2: groups (1, 1) and (0, 0) carry no signal, (0, 1) does.
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2).tolist() == [False, True, False]


def test_concat_pads_prompts_left_and_responses_right():
    a, b = make_rollout(1, 2, P=2, T=3), make_rollout(2, 1, P=4, T=1)
    both = concat_rollouts([a, b], PAD)
    assert both.input_ids.shape == (3, 4 + 3)
    # Row 0 (from a): two pad columns on the left of its prompt, its 3 response tokens last.
    assert both.input_ids[0].tolist() == [PAD, PAD, 1, 1, 101, 101, 101]
    assert both.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    # Row 2 (from b): full-width prompt, 1 response token, then right padding.
    assert both.input_ids[2].tolist() == [2, 2, 2, 2, 102, PAD, PAD]
    assert both.response_mask[2].tolist() == [1.0, 0.0, 0.0]
    assert both.logp[2].tolist() == [-2.0, 0.0, 0.0]
    assert both.completions == ["1-0", "1-1", "2-0"]
    assert both.truncated.tolist() == [False, True, True]  # a's rows 0, 1, then b's row 0
    assert rollout_rows(both, torch.tensor([2])).completions == ["2-0"]
    assert rollout_rows(both, torch.tensor([1, 0])).truncated.tolist() == [True, False]
    # Routes are padded like the tokens, with the valid experts (0, 1) on padding.
    routes = both.routes[0]
    assert routes.shape == (3, 7, 2)
    assert routes[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1, 1] and routes[0, :, 1].tolist() == [1, 1, 1, 1, 1, 1, 1]
    assert routes[2, :, 0].tolist() == [2, 2, 2, 2, 2, 0, 0]
    assert torch.equal(rollout_rows(both, torch.tensor([2])).routes[0], routes[2:3])


def test_zero_variance_groups_are_dropped_and_refilled():
    # 2 groups of G = 2 per draw. Draw 1: rewards (1, 1) | (0, 1) -> only group 1 informative.
    # Draw 2 (new prompts, other widths): (0, 1) | (1, 1) -> group 0 informative. 2 wanted: done after 1 refill.
    draws = iter([(make_rollout(1, 4, P=2, T=3), torch.tensor([1.0, 1.0, 0.0, 1.0])),
                  (make_rollout(2, 4, P=3, T=2), torch.tensor([0.0, 1.0, 1.0, 1.0]))])
    filled = fill_with_informative_groups(lambda: next(draws), num_groups=2, group_size=2, max_refills=3,
                                          pad_token_id=PAD)
    assert filled.warning is None
    assert filled.rollout.completions == ["1-2", "1-3", "2-0", "2-1"]
    assert filled.rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert filled.metrics == {"sampling/informative_fraction": 0.5, "sampling/refills": 1.0}
    assert filled.rollout.input_ids.shape == (4, 3 + 3)


def test_refill_cap_stops_the_loop_with_a_warning():
    # Every draw is solved by every response: no group ever has signal. With max_refills = 2 the
    # loop draws 1 + 2 times, then keeps the batch size by topping up with zero-variance groups.
    calls = []

    def draw():
        calls.append(1)
        return make_rollout(len(calls), 4, P=2, T=2), torch.ones(4)

    filled = fill_with_informative_groups(draw, num_groups=2, group_size=2, max_refills=2, pad_token_id=PAD)
    assert len(calls) == 3
    assert "only 0 of 2 groups" in filled.warning and "max_refill_rounds" in filled.warning
    assert filled.rewards.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert filled.rollout.input_ids.shape[0] == 4
    assert filled.metrics["sampling/refills"] == 2.0


def test_overlong_penalty():
    # Limit 8, buffer 2: no penalty up to 6 tokens, −0.5 at 7, −1 at 8 (the cut-off responses).
    lengths = torch.tensor([4.0, 6.0, 7.0, 8.0])
    assert overlong_penalty(lengths, max_len=8, buffer=2).tolist() == [0.0, 0.0, -0.5, -1.0]
    # DAPO's share 0.2 of an 8-token limit: buffer 1.6, 7 tokens are 0.6 into it -> −0.6 / 1.6 = −0.375.
    assert overlong_penalty(lengths, 8, 1.6)[2].item() == pytest.approx(-0.375)
    assert overlong_penalty(lengths, 8, 0.0).tolist() == [0.0] * 4


def test_a_full_rank_keeps_drawing_while_another_rank_is_short():
    # This rank fills its 2 groups on the first draw; another rank is short for one more round
    # (the all-reduce says so), so this rank draws once more, in lockstep, and keeps its first batch.
    draws = iter([(make_rollout(1, 4, P=2, T=3), torch.tensor([0.0, 1.0, 1.0, 0.0])),
                  (make_rollout(2, 4, P=2, T=3), torch.tensor([0.0, 1.0, 0.0, 1.0])),
                  (make_rollout(3, 4, P=2, T=3), torch.tensor([0.0, 1.0, 0.0, 1.0]))])
    others_short = iter([True, False])
    filled = fill_with_informative_groups(lambda: next(draws), num_groups=2, group_size=2, max_refills=3,
                                          pad_token_id=PAD, any_rank_short=lambda short: short or next(others_short))
    assert filled.metrics["sampling/refills"] == 1.0  # two draws, as on the short rank
    assert filled.rollout.completions == ["1-0", "1-1", "1-2", "1-3"] and filled.warning is None
    assert next(draws)[0].completions[0] == "3-0"  # the third draw was never taken
