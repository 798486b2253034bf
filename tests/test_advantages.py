"""Group-normalised advantages on hand-made rewards."""

import pytest
import torch

from gspo_cli.advantages import group_normalized_advantages


def test_each_group_is_normalised_on_its_own():
    # Group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) -> ±0.5·sqrt(3) = ±0.866.
    # Group 1: rewards 1, 1, 1, 1 -> all equal: no signal, advantages 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_normalized_advantages(rewards, group_size=4)
    assert torch.allclose(adv[:4], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-4)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_without_std_scaling_only_the_mean_is_removed():
    adv = group_normalized_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2, scale_std=False)
    assert torch.equal(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalized_advantages(torch.zeros(4), group_size=3)
