"""`aggregate`: every mode on hand-made losses, and sharded aggregation equals the whole batch."""

import pytest
import torch

from gspo_cli.algo.aggregation import AGGREGATIONS, aggregate

# Two responses of 2 and 3 tokens; the 99 sits on padding and must never count.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
TOKENS = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])  # sums 3 and 12, means 1.5 and 4


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 15 / 5),  # (1 + 2 + 3 + 4 + 5) / 5 tokens = 3
    ("seq-mean-token-mean", (1.5 + 4) / 2),  # 2.75
    ("seq-mean-token-sum", (3 + 12) / 2),  # 7.5
    ("seq-mean-token-sum-norm", 15 / (2 * 3)),  # horizon defaults to T = 3: 2.5
])
def test_each_mode_on_token_losses(mode, expected):
    assert aggregate(TOKENS, MASK, mode).item() == pytest.approx(expected)


def test_token_sum_norm_uses_the_given_horizon():
    # Dr. GRPO's constant: 15 / (2 sequences · 5) = 1.5, whatever the padded width.
    assert aggregate(TOKENS, MASK, "seq-mean-token-sum-norm", horizon=5).item() == pytest.approx(1.5)


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (2 * 2 - 1 * 3) / 5),  # each sequence counted once per token: 0.2
    ("seq-mean-token-mean", (2 - 1) / 2),  # 0.5
    ("seq-mean-token-sum", (2 * 2 - 1 * 3) / 2),  # 0.5
    ("seq-mean-token-sum-norm", (2 * 2 - 1 * 3) / (2 * 3)),  # 1/6
])
def test_each_mode_on_sequence_losses(mode, expected):
    values = torch.tensor([2.0, -1.0])  # one loss per sequence
    assert aggregate(values, MASK, mode).item() == pytest.approx(expected)
    # The same as spreading each sequence's loss over its tokens.
    assert aggregate(values[:, None].expand_as(MASK), MASK, mode).item() == pytest.approx(expected)


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(TOKENS, MASK, "token-avg")


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_two_shards_with_global_counts_average_to_the_whole_batch(mode, per_sequence):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 2, 5, 4, 3])  # the halves hold 8 and 12 tokens: unequal on purpose
    mask = (torch.arange(5)[None] < lengths[:, None]).float()
    values = torch.randn(6) if per_sequence else torch.randn(6, 5)
    whole = aggregate(values, mask, mode, horizon=5)
    counts = dict(num_tokens=mask.sum(), num_seqs=6, horizon=5, num_shards=2)
    halves = [aggregate(values[s], mask[s], mode, **counts) for s in (slice(0, 3), slice(3, 6))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-6, abs=1e-6)


def test_without_global_counts_token_mean_shards_disagree():
    # Why the counts matter: each half's own token-mean, averaged, weights the 8-token half's
    # tokens more than the 12-token half's. Values 1 on the first half, 0 on the second:
    # whole = 8 / 20 = 0.4, naive average of shard means = (1 + 0) / 2 = 0.5.
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 2, 5, 4, 3])[:, None]).float()
    values = torch.cat([torch.ones(3, 5), torch.zeros(3, 5)])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(0.4)
    naive = (aggregate(values[:3], mask[:3], "token-mean") + aggregate(values[3:], mask[3:], "token-mean")) / 2
    assert naive.item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_a_nan_at_a_padding_position_stays_out_of_the_loss(mode):
    # Per-token losses computed from whatever lies at padding (here NaN, inf) must not reach
    # the result: masked values are selected away, not multiplied by 0 (NaN · 0 = NaN).
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0], [6.0, float("inf"), -float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    clean = torch.where(mask.bool(), values, 0.0)
    torch.testing.assert_close(aggregate(values, mask, mode), aggregate(clean, mask, mode), rtol=0, atol=0)
