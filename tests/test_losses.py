"""The policy losses on hand-made tensors, with expected values worked out in comments."""

import math

import pytest
import torch

from gspo_cli.losses import LOSSES, gspo_loss, gspo_token_loss, grpo_loss, masked_mean, sequence_log_ratio

# Two responses: the first has 2 tokens, the second 3 (one padding column for the first).
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OLD = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.2, 0.4, 0.5]]))


def test_sequence_log_ratio_is_length_normalised():
    # seq 0: token log-ratios log 2 and 0 -> mean log 2 / 2; padding (log 100) ignored.
    # seq 1: log-ratios 0, 0, log 0.5 -> mean log(0.5) / 3.
    logp = OLD + torch.log(torch.tensor([[2.0, 1.0, 100.0], [1.0, 1.0, 0.5]]))
    expected = torch.tensor([math.log(2) / 2, math.log(0.5) / 3])
    assert torch.allclose(sequence_log_ratio(logp, OLD, MASK), expected, atol=1e-6)


def test_gspo_clips_whole_sequences():
    # Sequence ratios: s_0 = sqrt(2) ≈ 1.414 with A = +1 -> clipped to 1 + 4e-4, loss −1.0004.
    # s_1 = 0.5^(1/3) ≈ 0.794 with A = −1 -> clipped to 1 − 3e-4; min(−0.794, −0.9997) = −0.9997,
    # loss +0.9997. Mean over sequences: (−1.0004 + 0.9997) / 2 = −0.00035.
    logp = (OLD + torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]])))
    loss, m = gspo_loss(logp, OLD, torch.tensor([1.0, -1.0]), MASK, clip_low=3e-4, clip_high=4e-4)
    assert loss.item() == pytest.approx(-0.00035, abs=1e-6)
    # Both sequences clipped -> all 5 response tokens clipped; 2 high-side tokens, 3 low-side.
    assert m["clip/fraction"].item() == pytest.approx(1.0)
    assert m["clip/high_fraction"].item() == pytest.approx(2 / 5)
    assert m["clip/low_fraction"].item() == pytest.approx(3 / 5)
    assert m["clip/seq_fraction"].item() == pytest.approx(1.0)
    # ratio/mean is token-weighted: (2·1.414 + 3·0.794) / 5.
    assert m["ratio/mean"].item() == pytest.approx((2 * math.sqrt(2) + 3 * 0.5 ** (1 / 3)) / 5, rel=1e-5)


def test_gspo_inside_clip_range_is_plain_ratio_times_advantage():
    # Ratio exactly 1 for seq 0 (A = 2) and exp(1e-4) for seq 1 (A = −1): neither clipped.
    # loss = −(1·2 + exp(1e-4)·(−1)) / 2 = (exp(1e-4) − 2) / 2.
    logp = OLD.clone()
    logp[1] += 1e-4 * MASK[1]
    loss, m = gspo_loss(logp, OLD, torch.tensor([2.0, -1.0]), MASK)
    assert loss.item() == pytest.approx((math.exp(1e-4) - 2) / 2, rel=1e-6)
    assert m["clip/fraction"].item() == 0.0


def test_grpo_clips_single_tokens():
    # Token ratios seq 0: 2.0 (A=+1, > 1.27 -> clipped to 1.27), 1.0. seq 1: 1, 1, 0.5 (A=−1, < 0.8 ->
    # clipped to 0.8; −min(−0.5, −0.8) = 0.8).
    # seq 0 token mean: (−1.27 − 1) / 2 = −1.135; seq 1: (1 + 1 + 0.8) / 3 = 0.9333.
    # loss = (−1.135 + 0.93333) / 2 = −0.100833.
    logp = OLD + torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]]))
    loss, m = grpo_loss(logp, OLD, torch.tensor([1.0, -1.0]), MASK, clip_low=0.2, clip_high=0.27)
    assert loss.item() == pytest.approx(-0.100833, abs=1e-5)
    assert m["clip/fraction"].item() == pytest.approx(2 / 5)  # 2 of 5 response tokens
    assert m["clip/seq_fraction"].item() == pytest.approx(1.0)  # each sequence has one


def test_no_clipping_when_ratio_moves_against_the_advantage():
    # A > 0 and ratio far below 1: the unclipped term is the smaller one, so not clipped.
    logp = OLD - 1.0
    _, m = grpo_loss(logp, OLD, torch.tensor([1.0, 1.0]), MASK)
    assert m["clip/fraction"].item() == 0.0


def test_kl_old_new_is_zero_on_policy_and_positive_off_policy():
    _, m = gspo_loss(OLD.clone(), OLD, torch.tensor([1.0, -1.0]), MASK)
    assert m["kl/old_new"].item() == 0.0
    # log-ratio 0.1 on every token: k3 = e^0.1 − 1 − 0.1.
    _, m = gspo_loss(OLD + 0.1, OLD, torch.tensor([1.0, -1.0]), MASK)
    assert m["kl/old_new"].item() == pytest.approx(math.exp(0.1) - 1.1, rel=1e-4)


@pytest.mark.parametrize("shift", [0.0, 1e-4, 0.3])
def test_gspo_token_equals_gspo_for_sequence_advantages(shift):
    torch.manual_seed(0)
    old = torch.randn(4, 6).clamp(max=0) - 0.1
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 5, 1])[:, None]).float()
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])
    base = old + shift * torch.randn(4, 6)
    grads = []
    for loss_fn in (gspo_loss, gspo_token_loss):
        logp = base.clone().requires_grad_(True)
        loss, _ = loss_fn(logp, old, advantages, mask)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_gspo_gradient_at_ratio_one_is_length_normalised_reinforce():
    # On-policy (logp == old_logp) nothing is clipped and d(s_i)/d(logp_t) = s_i / |y_i| = 1 / |y_i|,
    # so the gradient of the mean loss is −A_i / (B · |y_i|) on each response token:
    # REINFORCE on the length-normalised log-likelihood.
    advantages = torch.tensor([1.5, -0.5])
    logp = OLD.clone().requires_grad_(True)
    loss, _ = gspo_loss(logp, OLD, advantages, MASK)
    loss.backward()
    lengths = MASK.sum(1, keepdim=True)
    expected = -advantages[:, None] * MASK / (2 * lengths)
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    # The same gradient as differentiating the surrogate −mean_i(A_i · mean_t logp).
    logp2 = OLD.clone().requires_grad_(True)
    (-(advantages * masked_mean(logp2, MASK, dim=1)).mean()).backward()
    assert torch.allclose(logp.grad, logp2.grad, atol=1e-7)


def test_padding_never_matters():
    logp = OLD + 0.01
    noisy = logp.clone()
    noisy[0, 2] = -50.0  # a padding position
    for name, loss_fn in LOSSES.items():
        a, ma = loss_fn(logp, OLD, torch.tensor([1.0, -1.0]), MASK)
        b, mb = loss_fn(noisy, OLD, torch.tensor([1.0, -1.0]), MASK)
        assert a.item() == pytest.approx(b.item()), name
        assert ma["clip/fraction"].item() == pytest.approx(mb["clip/fraction"].item()), name


def test_registry_shares_one_signature():
    assert set(LOSSES) >= {"gspo", "gspo-token", "grpo"}
    for name, loss_fn in LOSSES.items():
        loss, metrics = loss_fn(OLD + 0.01, OLD, torch.tensor([1.0, -1.0]), MASK, clip_low=0.1, clip_high=0.1)
        assert loss.dim() == 0, name
        assert {"clip/fraction", "clip/seq_fraction", "clip/low_fraction", "clip/high_fraction",
                "ratio/mean", "kl/old_new"} <= set(metrics), name
