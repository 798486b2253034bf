"""KL estimators, the sampler/trainer gap and its rollout-correction weights on hand-made numbers."""

import math

import pytest
import torch

from gspo_cli.algo.kl import kl_estimate
from gspo_cli.algo.rollout_correction import CORRECTIONS, importance_weights, logp_mismatch, truncated_is_weights


@pytest.mark.parametrize("estimator,expected", [
    # log ρ = log π_ref − log π_θ = log 0.25 − log 0.5 = −log 2 = −0.693147.
    ("k1", math.log(2)),  # −log ρ = 0.693147
    ("k2", 0.5 * math.log(2) ** 2),  # 0.240227
    ("k3", 0.5 - 1 + math.log(2)),  # ρ − 1 − log ρ = 0.193147
])
def test_estimators(estimator, expected):
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    assert kl_estimate(logp, ref, estimator).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_zero_where_the_policies_agree(estimator):
    logp = torch.log(torch.tensor([[0.3, 0.6]])).requires_grad_(True)
    kl = kl_estimate(logp, logp.detach(), estimator)
    assert torch.equal(kl.detach(), torch.zeros(1, 2))
    kl.sum().backward()
    # k2 and k3 have zero gradient at equality (a minimum); k1's is 1 (its gradient is the score function).
    assert torch.allclose(logp.grad, torch.ones(1, 2) if estimator == "k1" else torch.zeros(1, 2))


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_mismatch_metrics():
    # Trainer minus sampler: seq 0 [+0.1, −0.1, (pad 5)], seq 1 [0.3, 0.3, 0.3].
    # |Δ| token mean: (0.1 + 0.1 + 0.9) / 5 = 0.22. Sequence means 0 and 0.3 -> max exp(|.|) = e^0.3.
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    sampler = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 0.5]]))
    train = sampler + torch.tensor([[0.1, -0.1, 5.0], [0.3, 0.3, 0.3]])
    m = logp_mismatch(train, sampler, mask)
    assert m["mismatch/logp_abs_diff"].item() == pytest.approx(0.22, rel=1e-5)
    assert m["mismatch/seq_ratio_max"].item() == pytest.approx(math.exp(0.3), rel=1e-5)
    # A sampler's -inf (or NaN) at the padding position changes neither figure.
    for bad in (-float("inf"), float("nan")):
        padded = sampler.clone()
        padded[0, 2] = bad
        assert {k: v.item() for k, v in logp_mismatch(train, padded, mask).items()} == \
            {k: v.item() for k, v in m.items()}
    # No gap: 0 and exactly 1.
    m = logp_mismatch(sampler, sampler, mask)
    assert (m["mismatch/logp_abs_diff"].item(), m["mismatch/seq_ratio_max"].item()) == (0.0, 1.0)


def test_truncated_importance_weights():
    # π_train / π_sampler = e^0.5 = 1.6487 (kept), e^1 = 2.718 (capped at 2), e^−1 = 0.3679 (kept).
    sampler = torch.zeros(1, 3)
    train = torch.tensor([[0.5, 1.0, -1.0]], requires_grad=True)
    w = truncated_is_weights(train, sampler, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), 2.0, math.exp(-1.0)]]))
    assert not w.requires_grad


def test_rollout_correction_modes_on_hand_made_ratios():
    # One sequence of 3 tokens + 1 pad; token ratios ρ = e^0.5 = 1.649, e^1 = 2.718, e^-1 = 0.368
    # (the pad's log-ratio, 5, must count nowhere). Sequence ratio: e^(0.5 + 1 - 1) = e^0.5 = 1.649.
    train, sampler = torch.tensor([[0.5, 1.0, -1.0, 5.0]]), torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    e = torch.exp
    w, m = importance_weights(train, sampler, mask, "tis-token", cap=2.0)  # min(ρ, 2)
    assert torch.allclose(w[0, :3], torch.stack([e(torch.tensor(0.5)), torch.tensor(2.0), e(torch.tensor(-1.0))]))
    assert m["correction/truncated_fraction"].item() == pytest.approx(1 / 3)
    # Masked to 0 outside [1/2, 2]: 2.718 above, 0.368 below.
    w, m = importance_weights(train, sampler, mask, "mis-token", cap=2.0)
    assert torch.allclose(w[0, :3], torch.stack([e(torch.tensor(0.5)), torch.tensor(0.0), torch.tensor(0.0)]))
    assert m["correction/masked_fraction"].item() == pytest.approx(2 / 3)
    w, m = importance_weights(train, sampler, mask, "tis-seq", cap=1.5)  # min(1.649, 1.5) on every token
    assert torch.allclose(w[0, :3], torch.full((3,), 1.5)) and m["correction/truncated_fraction"].item() == 1.0
    w, m = importance_weights(train, sampler, mask, "mis-seq", cap=2.0)  # 1/2 ≤ 1.649 ≤ 2: kept whole
    assert torch.allclose(w[0, :3], torch.full((3,), e(torch.tensor(0.5)).item()))
    assert m["correction/masked_fraction"].item() == 0.0
    assert importance_weights(train, sampler, mask, "none", cap=2.0) == (None, {})
    with pytest.raises(ValueError, match="tis-seq"):
        importance_weights(train, sampler, mask, "tis", cap=2.0)


# Three responses as token ratios ρ_t (the sampler's log-probabilities 0, the trainer's log ρ_t),
# padded to T = 4:
#   row 0: 3, 0.25, 1.5, 0.8   product 0.9       geometric mean 0.9^(1/4) = 0.974
#   row 1: 1.5, 1.5, pad, pad  product 2.25      geometric mean 1.5
#   row 2: 0.6, 0.6, 0.6, pad  product 0.216     geometric mean 0.6
RATIOS = torch.tensor([[3.0, 0.25, 1.5, 0.8], [1.5, 1.5, 1.0, 1.0], [0.6, 0.6, 0.6, 1.0]])
RATIO_MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # 9 tokens


def _weights(mode, cap=2.0, cap_low=None):
    w, m = importance_weights(torch.log(RATIOS), torch.zeros(3, 4), RATIO_MASK, mode, cap, cap_low)
    return torch.where(RATIO_MASK.bool(), w, 0.0), {k: v.item() for k, v in m.items()}


def test_masked_modes_cut_both_tails_and_truncation_only_the_upper():
    # Token level, C = 2, C_low = 1/2. Row 0 has a ratio above C (3) and one below 1/C (0.25).
    # tis: min(ρ, 2): only the 3 changes (to 2); 0.25 stays 0.25: 1 token of 9 truncated.
    w, m = _weights("tis-token")
    assert torch.allclose(w[0], torch.tensor([2.0, 0.25, 1.5, 0.8]))
    assert m["correction/truncated_fraction"] == pytest.approx(1 / 9)
    # mis: 0 outside [1/2, 2]: the 3 (high) and the 0.25 (low); every other ratio kept as it is.
    w, m = _weights("mis-token")
    assert torch.allclose(w, torch.tensor([[0.0, 0.0, 1.5, 0.8], [1.5, 1.5, 0, 0], [0.6, 0.6, 0.6, 0]]))
    assert (m["correction/masked_fraction"], m["correction/masked_fraction_low"],
            m["correction/masked_fraction_high"]) == pytest.approx((2 / 9, 1 / 9, 1 / 9))
    # An explicit lower bound 0.2 keeps the 0.25; the truncated modes ignore it.
    w, m = _weights("mis-token", cap_low=0.2)
    assert w[0].tolist() == pytest.approx([0.0, 0.25, 1.5, 0.8]) and m["correction/masked_fraction_low"] == 0.0
    assert torch.equal(_weights("tis-token", cap_low=0.9)[0], _weights("tis-token")[0])
    # Sequence level, the product on every token. tis: row 0 0.9 (kept), row 1 min(2.25, 2) = 2,
    # row 2 0.216 (kept: no lower bound): row 1's 2 tokens of 9 truncated.
    w, m = _weights("tis-seq")
    assert torch.allclose(w, torch.tensor([[0.9] * 4, [2.0, 2.0, 0, 0], [0.216, 0.216, 0.216, 0]]))
    assert m["correction/truncated_fraction"] == pytest.approx(2 / 9)
    # mis: row 1 (2.25 > 2, 2 tokens) masked high, row 2 (0.216 < 1/2, 3 tokens) masked low.
    w, m = _weights("mis-seq")
    assert torch.allclose(w, torch.tensor([[0.9] * 4, [0.0] * 4, [0.0] * 4]))
    assert (m["correction/masked_fraction"], m["correction/masked_fraction_low"],
            m["correction/masked_fraction_high"]) == pytest.approx((5 / 9, 3 / 9, 2 / 9))
    assert m["correction/weight_mean"] == pytest.approx(4 * 0.9 / 9)


def test_geometric_mean_is_length_normalised():
    # Every ratio inside [1/2, 2] at the geometric level (0.974, 1.5, 0.6): nothing masked, each
    # token carries its sequence's geometric mean, where the product masked 5 tokens of 9 above.
    w, m = _weights("mis-geo")
    assert torch.allclose(w, torch.tensor([[0.9 ** 0.25] * 4, [1.5, 1.5, 0, 0], [0.6, 0.6, 0.6, 0]]))
    assert m["correction/masked_fraction"] == 0.0
    # A tight band, as the geometric level wants (verl suggests 1.0001-1.001): [1/1.2, 1.2] masks
    # row 1 (1.5, high) and row 2 (0.6, low); tis-geo truncates row 1 to 1.2.
    w, m = _weights("mis-geo", cap=1.2)
    assert (m["correction/masked_fraction_low"], m["correction/masked_fraction_high"]) == pytest.approx((3 / 9, 2 / 9))
    w, m = _weights("tis-geo", cap=1.2)
    assert torch.allclose(w, torch.tensor([[0.9 ** 0.25] * 4, [1.2, 1.2, 0, 0], [0.6, 0.6, 0.6, 0]]))
    assert m["correction/truncated_fraction"] == pytest.approx(2 / 9)
    # Sequences of different lengths with the same per-token gap, log ρ_t = 0.1 (8 tokens) and
    # -0.3 (3 tokens of 8): the products e^0.8 = 2.23 and e^-0.9 = 0.41 leave [1/2, 2], the
    # geometric means e^0.1 = 1.105 and e^-0.3 = 0.741 stay inside, at any length.
    train = torch.tensor([[0.1] * 8, [-0.3] * 3 + [0.0] * 5])
    mask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    _, m = importance_weights(train, torch.zeros(2, 8), mask, "mis-seq", cap=2.0)
    assert (m["correction/masked_fraction_low"], m["correction/masked_fraction_high"]) == pytest.approx((3 / 11, 8 / 11))
    w, m = importance_weights(train, torch.zeros(2, 8), mask, "mis-geo", cap=2.0)
    assert m["correction/masked_fraction"] == 0.0
    assert torch.allclose(w[:, 0], torch.tensor([math.exp(0.1), math.exp(-0.3)]))
    assert torch.allclose(w[1, :3], torch.full((3,), math.exp(-0.3)))


@pytest.mark.parametrize("mode", CORRECTIONS[1:])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_padding_never_counts_in_rollout_correction(mode, bad):
    # NaN or ±inf left at the padding positions of either log-probability change no weight of
    # a response token and no metric, in every mode.
    clean_w, clean_m = _weights(mode, cap=1.2)
    pad = ~RATIO_MASK.bool()
    for train, sampler in ((torch.where(pad, bad, torch.log(RATIOS)), torch.zeros(3, 4)),
                           (torch.log(RATIOS), torch.where(pad, bad, 0.0))):
        w, m = importance_weights(train, sampler, RATIO_MASK, mode, 1.2)
        assert torch.equal(torch.where(pad, 0.0, w), clean_w)
        assert {k: v.item() for k, v in m.items()} == clean_m


def test_masked_modes_need_a_lower_bound_below_the_cap():
    with pytest.raises(ValueError, match="rollout_correction_cap_low"):
        _weights("mis-token", cap=2.0, cap_low=2.5)
    with pytest.raises(ValueError, match="rollout_correction_cap_low"):
        _weights("mis-seq", cap=0.8)  # 1/C = 1.25 > C: an empty band
    _weights("tis-token", cap=0.8)  # the truncated modes have no lower bound
