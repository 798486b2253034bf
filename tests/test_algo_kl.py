"""KL estimators, the sampler/trainer gap and truncated importance weights on hand-made numbers."""

import math

import pytest
import torch

from gspo_cli.algo.kl import kl_estimate
from gspo_cli.algo.rollout_correction import logp_mismatch, truncated_is_weights


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
    from gspo_cli.algo.rollout_correction import importance_weights

    train, sampler = torch.tensor([[0.5, 1.0, -1.0, 5.0]]), torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    e = torch.exp
    w, m = importance_weights(train, sampler, mask, "tis-token", cap=2.0)  # min(ρ, 2)
    assert torch.allclose(w[0, :3], torch.stack([e(torch.tensor(0.5)), torch.tensor(2.0), e(torch.tensor(-1.0))]))
    assert m["correction/truncated_fraction"].item() == pytest.approx(1 / 3)
    w, m = importance_weights(train, sampler, mask, "mis-token", cap=2.0)  # 2.718 > 2: masked to 0
    assert torch.allclose(w[0, :3], torch.stack([e(torch.tensor(0.5)), torch.tensor(0.0), e(torch.tensor(-1.0))]))
    assert m["correction/masked_fraction"].item() == pytest.approx(1 / 3)
    w, m = importance_weights(train, sampler, mask, "tis-seq", cap=1.5)  # min(1.649, 1.5) on every token
    assert torch.allclose(w[0, :3], torch.full((3,), 1.5)) and m["correction/truncated_fraction"].item() == 1.0
    w, m = importance_weights(train, sampler, mask, "mis-seq", cap=2.0)  # 1.649 ≤ 2: kept whole
    assert torch.allclose(w[0, :3], torch.full((3,), e(torch.tensor(0.5)).item()))
    assert m["correction/masked_fraction"].item() == 0.0
    assert importance_weights(train, sampler, mask, "none", cap=2.0) == (None, {})
    with pytest.raises(ValueError, match="tis-seq"):
        importance_weights(train, sampler, mask, "tis", cap=2.0)
