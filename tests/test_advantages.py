"""Advantage estimators on hand-made rewards."""

import pytest
import torch

from gspo_cli.algo.advantages import compute_advantages


def test_each_group_is_normalised_on_its_own():
    # Group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) -> ±0.5·sqrt(3) = ±0.866.
    # Group 1: rewards 1, 1, 1, 1 -> all equal: no signal, advantages 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = compute_advantages(rewards, 4, "group-mean", "group-std")
    assert torch.allclose(adv[:4], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-4)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_without_std_scaling_only_the_mean_is_removed():
    adv = compute_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2, scale="none")
    assert torch.equal(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_rloo_compares_each_reward_with_the_others():
    # Group 1, 0, 0, 1: for a 1 the others average (0 + 0 + 1) / 3 = 1/3 -> A = 2/3;
    # for a 0 they average 2/3 -> A = −2/3. That is G/(G − 1) · (r − mean) = 4/3 · ±0.5.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = compute_advantages(rewards, 4, baseline="rloo", scale="none")
    assert torch.allclose(adv, torch.tensor([2, -2, -2, 2]) / 3)
    # With group-std scaling: (2/3) / sqrt(1/3) = 1.154701.
    adv = compute_advantages(rewards, 4, baseline="rloo", scale="group-std")
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 1.154701, atol=1e-5)


def test_batch_std_divides_every_group_by_one_number():
    # Rewards 1 0 0 1 | 1 1 1 1: batch mean 0.75, squared deviations 6 · 0.0625 + 2 · 0.5625 = 1.5,
    # unbiased variance 1.5 / 7, std 0.462910. Group 0 centred ±0.5 -> ±1.080123; group 1 -> 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = compute_advantages(rewards, 4, scale="batch-std")
    assert torch.allclose(adv, torch.tensor([1.080123, -1.080123, -1.080123, 1.080123, 0, 0, 0, 0]), atol=1e-5)


def test_bad_options_name_the_choices():
    with pytest.raises(ValueError, match="rloo"):
        compute_advantages(torch.zeros(4), 2, baseline="loo")
    with pytest.raises(ValueError, match="batch-std"):
        compute_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages(torch.zeros(4), 1, baseline="rloo")


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 3"):
        compute_advantages(torch.zeros(4), 3)
