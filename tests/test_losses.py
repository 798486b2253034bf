"""The policy losses on hand-made tensors, with expected values worked out in comments."""

import math

import pytest
import torch

from gspo_cli.algo.aggregation import AGGREGATIONS, aggregate, aggregation_warning
from gspo_cli.algo.losses import (
    LOSSES,
    cispo_loss,
    gmpo_loss,
    grpo_loss,
    gspo_loss,
    gspo_token_loss,
    masked_mean,
    sapo_loss,
    sequence_log_ratio,
)

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


def test_clip_shares_over_the_tokens_with_a_non_zero_advantage():
    # Three responses (the 2- and 3-token rows of MASK and a second 3-token row) with A = +1, 0, −1.
    # Token ratios: row 0: 2 (> 1.27: clipped), 1; row 1 (A = 0): 2, 2, 2, never clipped: no gradient
    # to clip; row 2: 1, 1, 0.5 (< 0.8: clipped). 8 tokens, 5 with A ≠ 0, 2 clipped:
    # clip/fraction 2/8, adv/nonzero_fraction 5/8, clip/nonzero_adv_share 2/8 (update_policy: 2/5).
    mask = torch.cat([MASK, MASK[1:]])
    old = torch.cat([OLD, OLD[1:]])
    logp = old + torch.log(torch.tensor([[2.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 1.0, 0.5]]))
    _, m = grpo_loss(logp, old, torch.tensor([1.0, 0.0, -1.0]), mask, clip_low=0.2, clip_high=0.27)
    assert m["clip/fraction"].item() == pytest.approx(2 / 8)
    assert m["adv/nonzero_fraction"].item() == pytest.approx(5 / 8)
    assert m["clip/nonzero_adv_share"].item() == pytest.approx(2 / 8)
    # SAPO counts a damped gate whatever the advantage: row 1's ratio 4 is damped (weight 0.18)
    # though A = 0, so its 3 tokens are in clip/fraction (3/8) but not in the non-zero share (0).
    _, m = sapo_loss(old + torch.log(torch.tensor([[1.0, 1.0, 1.0], [4.0, 4.0, 4.0], [1.0, 1.0, 1.0]])), old,
                     torch.tensor([1.0, 0.0, -1.0]), mask)
    assert m["clip/fraction"].item() == pytest.approx(3 / 8)
    assert m["clip/nonzero_adv_share"].item() == 0.0


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_non_finite_value_at_a_padding_position_changes_nothing(name, mode, bad):
    # Padding positions hold whatever the sampler or the forward pass left there (an engine's
    # -inf, a NaN): loss, gradient and metrics must be those of a clean batch. Multiplying by
    # the mask would not do: NaN · 0 = NaN, and exp(inf) · 0 = NaN.
    old, mask, advantages = _batch()
    base = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    weights = torch.full_like(mask, 1.5)
    padding = mask == 0
    results = []
    for poison in (False, True):
        logp, old_logp, is_weights = base.clone(), old.clone(), weights.clone()
        if poison:
            for tensor in (logp, old_logp, is_weights):
                tensor[padding] = bad
        logp.requires_grad_(True)
        loss, metrics = LOSSES[name](logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2,
                                     loss_agg=mode, is_weights=is_weights, horizon=8)
        loss.backward()
        results.append((loss.detach(), logp.grad, metrics))
    (clean, clean_grad, clean_metrics), (poisoned, grad, metrics) = results
    assert torch.isfinite(poisoned) and torch.isfinite(grad).all(), (name, mode)
    torch.testing.assert_close(poisoned, clean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, clean_grad, rtol=1e-6, atol=1e-7)
    for key, value in clean_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_registry_shares_one_signature():
    assert set(LOSSES) >= {"gspo", "gspo-token", "grpo", "dr-grpo", "dapo", "cispo", "sapo", "gmpo",
                           "luspo", "vespo", "icepop", "dppo", "clip-cov", "kl-cov"}
    for name, loss_fn in LOSSES.items():
        loss, metrics = loss_fn(OLD + 0.01, OLD, torch.tensor([1.0, -1.0]), MASK, clip_low=0.1, clip_high=0.1)
        assert loss.dim() == 0, name
        assert {"clip/fraction", "clip/seq_fraction", "clip/low_fraction", "clip/high_fraction",
                "ratio/mean", "kl/old_new"} <= set(metrics), name


# ---------------------------------------------------------------------------- the variants
# The same hand-made batch as above: token ratios seq 0 = [2, 1] with A = +1, seq 1 = [1, 1, 0.5]
# with A = −1 (5 response tokens).
RATIOS = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]])
ADV = torch.tensor([1.0, -1.0])


def test_dapo_is_clip_higher_grpo_with_token_mean():
    # Clip 0.2 / 0.28: r = 2 (A = +1) clipped to 1.28 -> −1.28; r = 1 -> −1 (seq 0).
    # seq 1 (A = −1): r = 1, 1 -> +1, +1; r = 0.5 < 0.8 -> −min(−0.5, −0.8) = +0.8.
    # token-mean over the 5 tokens: (−1.28 − 1 + 1 + 1 + 0.8) / 5 = 0.52 / 5 = 0.104.
    loss, m = LOSSES["dapo"](OLD + torch.log(RATIOS), OLD, ADV, MASK, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(0.104, abs=1e-6)
    assert m["clip/fraction"].item() == pytest.approx(2 / 5)


def test_dr_grpo_divides_the_token_sum_by_a_constant():
    # Token losses as GRPO (clip 0.2 / 0.27): −1.27, −1 | 1, 1, 0.8 -> sum 0.53.
    # Divided by B · H: H = 3 (the padded width) by default -> 0.53 / 6; with horizon 8 -> 0.53 / 16.
    logp = OLD + torch.log(RATIOS)
    loss, _ = LOSSES["dr-grpo"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27)
    assert loss.item() == pytest.approx(0.53 / 6, abs=1e-6)
    loss, _ = LOSSES["dr-grpo"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27, horizon=8)
    assert loss.item() == pytest.approx(0.53 / 16, abs=1e-6)


def test_cispo_weights_log_probs_and_keeps_clipped_tokens_gradient():
    # logp: seq 0 = [log 1, log 0.5] = [0, −0.693147]; seq 1 = [log 0.2, log 0.4, log 0.25]
    # = [−1.609438, −0.916291, −1.386294]. Weights sg[clip(r, 0, 1.28)]: [1.28, 1] and [1, 1, 0.5].
    # Per token −w·A·logp: seq 0: 0, +0.693147; seq 1 (A = −1): −1.609438, −0.916291, −0.693147.
    # token-mean: −2.525729 / 5 = −0.505146.
    logp = (OLD + torch.log(RATIOS)).requires_grad_(True)
    loss, m = cispo_loss(logp, OLD, ADV, MASK, clip_low=1.0, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.505146, abs=1e-5)
    assert m["clip/fraction"].item() == pytest.approx(1 / 5)  # only r = 2 is truncated
    assert m["clip/high_fraction"].item() == pytest.approx(1 / 5)
    loss.backward()
    # The truncated token still gets −w·A / N = −1.28 / 5 (GRPO would give it 0).
    assert logp.grad[0, 0].item() == pytest.approx(-1.28 / 5, rel=1e-6)


def test_sapo_soft_gate():
    # f(r) = σ(τ(r − 1)) · 4/τ, loss −A·f. seq 0 (A = +1, τ = 1): r = 2 -> 4σ(1) = 2.924234; r = 1 -> 2.
    # seq 0 mean: −(2.924234 + 2) / 2 = −2.462117.
    # seq 1 (A = −1, τ = 1.05): r = 1 -> 2/1.05 = 1.904762 (twice); r = 0.5 -> 4σ(−0.525)/1.05 = 1.415938.
    # seq 1 mean: (2 · 1.904762 + 1.415938) / 3 = 1.741821. seq-mean-token-mean: −0.360148.
    loss, m = sapo_loss(OLD + torch.log(RATIOS), OLD, ADV, MASK, tau_pos=1.0, tau_neg=1.05)
    assert loss.item() == pytest.approx(-0.360148, abs=1e-5)
    # Gate weights 4σ(1 − σ): r = 2 -> 0.786 (≥ 1/2, not "clipped"); nothing is damped below half.
    assert m["clip/fraction"].item() == 0.0
    # r = 4 (A = +1): weight 4σ(3)(1 − σ(3)) = 0.1807 < 1/2 -> counted as clipped (high side).
    _, m = sapo_loss(OLD + torch.log(torch.tensor([[4.0, 1.0, 1.0], [1.0, 1.0, 1.0]])), OLD, ADV, MASK)
    assert m["clip/high_fraction"].item() == pytest.approx(1 / 5)
    assert m["gate/weight_mean"].item() == pytest.approx((0.180707 + 4) / 5, abs=1e-5)


def test_gmpo_clips_token_log_ratios_before_the_geometric_mean():
    # clip ±0.4 in log space. seq 0 (A = +1): log-ratios [0.693, 0] -> min with clamp: [0.4, 0];
    # mean 0.2, ratio e^0.2 = 1.221403, loss −1.221403.
    # seq 1 (A = −1): [0, 0, −0.693] -> max with clamp: [0, 0, −0.4]; mean −0.13333, ratio 0.875173,
    # loss +0.875173. Mean over sequences: (−1.221403 + 0.875173) / 2 = −0.173115.
    logp = (OLD + torch.log(RATIOS)).requires_grad_(True)
    loss, m = gmpo_loss(logp, OLD, ADV, MASK, clip_low=0.4, clip_high=0.4)
    assert loss.item() == pytest.approx(-0.173115, abs=1e-5)
    assert (m["clip/low_fraction"].item(), m["clip/high_fraction"].item()) == (pytest.approx(0.2), pytest.approx(0.2))
    loss.backward()
    # Clipped tokens get no gradient, the others do.
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 2].item() == 0.0
    assert logp.grad[0, 1].item() != 0.0 and logp.grad[1, 0].item() != 0.0


# ---------------------------------------------------------------------------- invariants


def _batch(seed: int = 0):
    torch.manual_seed(seed)
    old = torch.randn(4, 6).clamp(max=0) - 0.1
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 5, 1])[:, None]).float()
    return old, mask, torch.tensor([1.0, -0.5, 0.25, -2.0])


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_at_ratio_one_is_reinforce_under_each_aggregation(name, mode):
    # On-policy nothing is clipped and every ratio (token, sequence, geometric mean, soft gate
    # derivative, CISPO's weight) is 1 with d ratio / d logp_t = 1 (or 1/|y| for a sequence ratio,
    # which the |y| of the token count in the aggregation undoes), so each loss's gradient is
    # that of the REINFORCE surrogate −aggregate(A · logp) under the same aggregation.
    # Clip-Cov takes a few tokens out of the gradient even on-policy, by design (tested in
    # test_followup_losses.py); an empty covariance band leaves it the plain surrogate here.
    params = {"clip_cov_lb": math.inf} if name == "clip-cov" else {}
    old, mask, advantages = _batch()
    logp = old.clone().requires_grad_(True)
    loss, _ = LOSSES[name](logp, old, advantages, mask, clip_low=0.2, clip_high=0.2, loss_agg=mode, horizon=8,
                           **params)
    loss.backward()
    reference = old.clone().requires_grad_(True)
    (-aggregate(advantages[:, None] * reference, mask, mode, horizon=8)).backward()
    assert torch.allclose(logp.grad, reference.grad, atol=1e-7), (name, mode)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("shift", [1e-4, 0.3])
def test_gspo_token_equals_gspo_under_every_aggregation(mode, shift):
    old, mask, advantages = _batch()
    base = old + shift * torch.randn(4, 6)
    results = []
    for loss_fn in (gspo_loss, gspo_token_loss):
        logp = base.clone().requires_grad_(True)
        loss, _ = loss_fn(logp, old, advantages, mask, loss_agg=mode)
        loss.backward()
        results.append((loss.detach(), logp.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_importance_weights_scale_the_loss():
    # Token weights 2 everywhere: a token-level loss doubles; a sequence-level loss is weighted by
    # the per-sequence geometric mean of its token weights, here also 2.
    logp = OLD + 0.01
    for loss_fn in (grpo_loss, gspo_loss):
        plain, _ = loss_fn(logp, OLD, ADV, MASK)
        weighted, _ = loss_fn(logp, OLD, ADV, MASK, is_weights=torch.full_like(MASK, 2.0))
        assert weighted.item() == pytest.approx(2 * plain.item(), rel=1e-6)
    # Geometric mean for sequences: seq 0 weights [4, 1] -> 2; seq 1 weights [1, 1, 1] -> 1.
    w = torch.tensor([[4.0, 1.0, 7.0], [1.0, 1.0, 1.0]])
    per_seq_plain = [gspo_loss(logp[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1])[0].item() for i in range(2)]
    weighted, _ = gspo_loss(logp, OLD, ADV, MASK, is_weights=w)
    assert weighted.item() == pytest.approx((2 * per_seq_plain[0] + per_seq_plain[1]) / 2, rel=1e-5)


def test_sequence_ratio_with_token_sum_warns():
    assert aggregation_warning("gspo", "seq-mean-token-sum") is not None
    assert "length" in aggregation_warning("gmpo", "seq-mean-token-sum-norm")
    assert aggregation_warning("gspo", "seq-mean-token-mean") is None
    assert aggregation_warning("grpo", "seq-mean-token-sum") is None
