"""GSPO's follow-ups (algo/followup_losses.py, algo/off_policy_mask.py): hand-made tensors with the
expected values worked out in comments, and, for what TRL 1.16 implements (LUSPO, VESPO, off-policy
sequence masking), the same inputs through TRL's own loss code, loss and gradient equal to 1e-5."""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gspo_cli.algo.followup_losses import centred_covariance, gamma_weight
from gspo_cli.algo.losses import LOSSES, grpo_loss, gspo_loss

# The batch of test_losses.py: two responses of 2 and 3 tokens (one padding column for the first),
# token ratios [2, 1] with A = +1 and [1, 1, 0.5] with A = −1.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OLD = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.2, 0.4, 0.5]]))
RATIOS = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]])
ADV = torch.tensor([1.0, -1.0])


def with_grad(logp: torch.Tensor) -> torch.Tensor:
    return logp.clone().requires_grad_(True)


# ---------------------------------------------------------------------------- LUSPO


def test_luspo_is_gspo_with_each_sequence_weighted_by_its_length():
    # GSPO's terms (test_losses.py): s_0 = √2 clipped to 1 + 4e-4 with A = +1 -> −1.0004;
    # s_1 = 0.5^(1/3) = 0.7937 with A = −1 -> +0.9997. GSPO averages them: −0.00035.
    # LUSPO weights each by its length: (2 · (−1.0004) + 3 · 0.9997) / 2 = 0.49915.
    logp = OLD + torch.log(RATIOS)
    loss, m = LOSSES["luspo"](logp, OLD, ADV, MASK, clip_low=3e-4, clip_high=4e-4)
    assert loss.item() == pytest.approx(0.49915, abs=1e-6)
    assert gspo_loss(logp, OLD, ADV, MASK)[0].item() == pytest.approx(-0.00035, abs=1e-6)
    assert (m["clip/low_fraction"].item(), m["clip/high_fraction"].item()) == \
        (pytest.approx(3 / 5), pytest.approx(2 / 5))


def test_luspo_gradient_on_policy_is_the_same_for_every_token_whatever_the_length():
    # On-policy d s_i / d logp_t = 1/|y_i|, times the length weight |y_i|: every token of response i
    # gets −A_i / B, the 2-token and the 3-token response alike (GSPO: −A_i / (B |y_i|)).
    logp = with_grad(OLD)
    LOSSES["luspo"](logp, OLD, torch.tensor([1.5, -0.5]), MASK)[0].backward()
    expected = -torch.tensor([[1.5], [-0.5]]) / 2 * MASK
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- VESPO


def test_vespo_weights_each_sequence_by_the_gamma_kernel_of_its_unnormalised_ratio():
    # w_i = Π_t r_t (no length normalisation): w_0 = 2 · 1 = 2, w_1 = 1 · 1 · 0.5 = 0.5.
    # A_0 = +1: k = 2, λ = 3 -> φ = e^3 · 2^2 · e^(−6) = 4 e^(−3) = 0.199148.
    # A_1 = −1: k = 3, λ = 2 -> φ = e^2 · 0.5^3 · e^(−1) = e / 8 = 0.339785.
    # logp: seq 0 = [0, −0.693147]; seq 1 = [−1.609438, −0.916291, −1.386294] (sum −3.912023).
    # −φ·A·Σ logp: seq 0: −0.199148 · (−0.693147) = 0.138039; seq 1: 0.339785 · (−3.912023) = −1.329248.
    # token-mean over 5 tokens: (0.138039 − 1.329248) / 5 = −0.238242.
    logp = with_grad(OLD + torch.log(RATIOS))
    loss, m = LOSSES["vespo"](logp, OLD, ADV, MASK)
    assert loss.item() == pytest.approx(-0.238242, abs=1e-5)
    loss.backward()
    # φ is detached: each token's gradient is −φ_i A_i / 5.
    expected = torch.tensor([[-0.199148, -0.199148, 0.0], [0.339785, 0.339785, 0.339785]]) / 5
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-6)
    # Both φ are below 1/2, so every token counts as clipped: seq 0's on the high side (w = 2 > 1),
    # seq 1's on the low side (w = 0.5).
    assert (m["clip/high_fraction"].item(), m["clip/low_fraction"].item()) == \
        (pytest.approx(2 / 5), pytest.approx(3 / 5))
    assert m["gate/seq_weight_mean"].item() == pytest.approx((0.199148 + 0.339785) / 2, abs=1e-6)


def test_vespo_puts_rollout_correction_weights_into_w_not_onto_the_loss():
    # ρ = 2 on seq 0's first token makes w_0 = 2 · 2 = 4: φ = e^3 · 16 · e^(−12) = 16 e^(−9) = 0.0019747,
    # and seq 0's term −φ·Σ logp = 0.0019747 · 0.693147 = 0.0013688; seq 1 unchanged (−1.329248).
    weights = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    loss, _ = LOSSES["vespo"](OLD + torch.log(RATIOS), OLD, ADV, MASK, is_weights=weights)
    assert loss.item() == pytest.approx((0.0013688 - 1.329248) / 5, abs=1e-5)


def test_gamma_kernel_is_one_at_one_and_peaks_at_k_over_lambda():
    k, lam = torch.tensor(2.0), torch.tensor(3.0)
    assert gamma_weight(torch.tensor(0.0), k, lam).item() == pytest.approx(1.0)
    # The maximum of e^λ w^k e^(−λw) is at w = k/λ = 2/3: e^3 (4/9) e^(−2) = 4e/9 = 1.208.
    w = torch.linspace(0.05, 3.0, 300)
    phi = gamma_weight(torch.log(w), k, lam)
    assert w[phi.argmax()].item() == pytest.approx(2 / 3, abs=0.01)
    assert phi.max().item() == pytest.approx(4 * math.e / 9, rel=1e-3)


# ---------------------------------------------------------------------------- IcePop


def test_icepop_masks_tokens_outside_the_band_and_weights_the_rest_by_the_engines_ratio():
    # k = π_old(trainer) / π_sampler per token: [0.4, 1] and [6, 2, 1]. Band [0.5, 5]: 0.4 and 6
    # are masked, M(k) = [0, 1] and [0, 2, 1].
    # GRPO's token terms (clip 0.2 / 0.27): seq 0 (A = +1): r = 2 -> −1.27 (clipped high), r = 1 -> −1;
    # seq 1 (A = −1): r = 1 -> +1, r = 1 -> +1, r = 0.5 -> +0.8 (clipped low).
    # Weighted: seq 0 mean (0 − 1) / 2 = −0.5; seq 1 mean (0 + 2 + 0.8) / 3 = 0.933333.
    # seq-mean-token-mean: (−0.5 + 0.933333) / 2 = 0.216667.
    k = torch.tensor([[0.4, 1.0, 1.0], [6.0, 2.0, 1.0]])
    logp = with_grad(OLD + torch.log(RATIOS))
    loss, m = LOSSES["icepop"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27, sampler_logp=OLD - torch.log(k))
    assert loss.item() == pytest.approx(0.216667, abs=1e-5)
    assert m["icepop/masked_fraction"].item() == pytest.approx(2 / 5)
    assert m["icepop/weight_mean"].item() == pytest.approx((0 + 1 + 0 + 2 + 1) / 5)
    loss.backward()
    # Masked tokens get no gradient; seq 1's second token (r = 1, A = −1, M = 2): +2 / (3 · 2).
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0
    assert logp.grad[1, 1].item() == pytest.approx(2 / 6)


def test_icepop_without_the_samplers_numbers_is_grpo():
    logp = OLD + torch.log(RATIOS)
    icepop, m = LOSSES["icepop"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27)
    assert icepop.item() == grpo_loss(logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27)[0].item()
    assert m["icepop/masked_fraction"].item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
@pytest.mark.parametrize("name, params", [("icepop", {}), ("gspo", {"off_policy_mask_threshold": 0.5})])
def test_a_non_finite_sampler_value_at_padding_changes_nothing(name, params, bad):
    # An engine leaves −inf (or NaN) at padding. The 2-token response has A = −1 here, so the
    # masking's mean KL over it must skip the padding: log π_sampler − log π_θ = −log k − log r =
    # [0.223, 0], mean 0.112 ≤ 0.5, kept; a NaN taken into that mean would mask it.
    k = torch.tensor([[0.4, 1.0, 1.0], [6.0, 2.0, 1.0]])
    sampler = OLD - torch.log(k)
    results = []
    for poison in (False, True):
        logp, sampler_logp = with_grad(OLD + torch.log(RATIOS)), sampler.clone()
        if poison:
            sampler_logp[MASK == 0] = bad
        loss, metrics = LOSSES[name](logp, OLD, -ADV, MASK, sampler_logp=sampler_logp, **params)
        loss.backward()
        results.append((loss.detach(), logp.grad, metrics))
    (clean, clean_grad, clean_metrics), (poisoned, grad, metrics) = results
    assert torch.isfinite(poisoned) and torch.isfinite(grad).all()
    torch.testing.assert_close((poisoned, grad), (clean, clean_grad), rtol=0, atol=0)
    for key, value in clean_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------- DPPO

# Three responses of 2, 3 and 1 tokens; p_old and p_θ of the sampled tokens, A = +1, −1, 0.
DPPO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
DPPO_P_OLD = torch.tensor([[0.5, 0.5, 1.0], [0.2, 0.4, 0.5], [0.5, 1.0, 1.0]])
DPPO_P_NEW = torch.tensor([[1.0, 0.25, 1.0], [0.5, 0.4, 0.25], [0.1, 1.0, 1.0]])
DPPO_ADV = torch.tensor([1.0, -1.0, 0.0])


def test_dppo_masks_only_moves_past_the_trust_region_in_the_advantages_direction():
    # p_θ − p_old: [+0.5, −0.25], [+0.3, 0, −0.25], [−0.4]; δ = 0.2 on both sides.
    # (0,0): A > 0 and +0.5 > 0.2 -> masked (high). (1,2): A < 0 and −0.25 < −0.2 -> masked (low).
    # (0,1) fell by 0.25 and (1,0) rose by 0.3, both against their advantage: kept. (2,0): A = 0.
    # Per token −keep·A·r + 1e-3 (log r)², r = [2, 0.5], [2.5, 1, 0.5], [0.2]:
    # (0,0) 1e-3 (ln 2)² = 0.00048045; (0,1) −0.5 + 0.00048045; (1,0) 2.5 + 1e-3 (ln 2.5)² = 2.50083959;
    # (1,1) 1; (1,2) 0.00048045; (2,0) 1e-3 (ln 0.2)² = 0.00259029. Sum 3.00487123 / 6 tokens = 0.50081187.
    logp = with_grad(torch.log(DPPO_P_NEW))
    loss, m = LOSSES["dppo"](logp, torch.log(DPPO_P_OLD), DPPO_ADV, DPPO_MASK, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(0.50081187, abs=1e-6)
    assert (m["clip/high_fraction"].item(), m["clip/low_fraction"].item()) == \
        (pytest.approx(1 / 6), pytest.approx(1 / 6))
    loss.backward()
    # A masked token keeps only the KL term's gradient 2·1e-3·log r / 6; a kept one adds −A·r / 6.
    expected = torch.tensor([[2e-3 * math.log(2), -0.5 + 2e-3 * math.log(0.5), 0.0],
                             [2.5 + 2e-3 * math.log(2.5), 1.0, 2e-3 * math.log(0.5)],
                             [2e-3 * math.log(0.2), 0.0, 0.0]]) / 6
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- Clip-Cov and KL-Cov

# Three responses of 3, 2 and 1 tokens with A = +2, −2, 0. Token means: A 2/6 = 0.3333, log π −2.8.
COV_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
COV_LOGP = torch.tensor([[-0.1, -0.2, -3.0], [-6.0, -3.5, 0.0], [-4.0, 0.0, 0.0]])
COV_ADV = torch.tensor([2.0, -2.0, 0.0])


def test_covariance_terms():
    # (A − 1/3)(log π + 2.8): (0,0) (5/3)(2.7) = 4.5; (0,1) (5/3)(2.6) = 4.3333; (0,2) (5/3)(−0.2) = −0.3333;
    # (1,0) (−7/3)(−3.2) = 7.4667; (1,1) (−7/3)(−0.7) = 1.6333; (2,0) (−1/3)(−1.2) = 0.4; padding −inf.
    cov = centred_covariance(COV_ADV[:, None].expand(3, 3), COV_LOGP, COV_MASK)
    expected = torch.tensor([[4.5, 13 / 3, -1 / 3], [7.4667, 1.6333, -math.inf], [0.4, -math.inf, -math.inf]])
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-4)


def test_clip_cov_detaches_the_unclipped_tokens_whose_covariance_is_in_the_band():
    # Token ratios [1, 1.5, 1], [1, 0.5], [1]; PPO clip 0.2 both sides. In the band (1, 5): (0,0) 4.5,
    # (0,1) 4.33 and (1,1) 1.63; (1,0) 7.47 is above it, (2,0) 0.4 below (A = 0). (0,1) is clipped high
    # (r = 1.5 > 1.2, A > 0) and (1,1) clipped low (r = 0.5 < 0.8, A < 0): not candidates. With up to
    # 3 picks (ratio 0.5 of 6 tokens) only (0,0) is detached. Token terms: (0,0) −2 -> 0; (0,1) −2.4;
    # (0,2) −2; (1,0) +2; (1,1) −min(−1, −1.6) = +1.6; (2,0) 0. token-mean (−2.4 − 2 + 2 + 1.6) / 6.
    ratios = torch.tensor([[1.0, 1.5, 1.0], [1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    logp = with_grad(COV_LOGP)
    loss, m = LOSSES["clip-cov"](logp, COV_LOGP - torch.log(ratios), COV_ADV, COV_MASK, clip_low=0.2, clip_high=0.2,
                                 clip_cov_ratio=0.5)
    assert loss.item() == pytest.approx(-0.8 / 6, abs=1e-6)
    assert m["cov/selected_fraction"].item() == pytest.approx(1 / 6)
    assert (m["clip/low_fraction"].item(), m["clip/high_fraction"].item()) == \
        (pytest.approx(1 / 6), pytest.approx(1 / 6))
    loss.backward()
    # (0,0) lost its gradient (it would be −2/6); the unclipped, undetached tokens keep −A·r/6.
    assert logp.grad[0, 0].item() == 0.0
    assert (logp.grad[0, 2].item(), logp.grad[1, 0].item()) == (pytest.approx(-2 / 6), pytest.approx(2 / 6))


def test_clip_cov_detaches_at_most_its_share_of_the_tokens():
    # All ratios 1: the in-band candidates are (0,0) 4.5, (0,1) 4.33 and (1,1) 1.63. The default
    # share 2e-4 of 6 tokens rounds to the minimum of 1 pick: one of the three, at random.
    # Token terms −A: −2, −2, −2 | +2, +2 | 0; (0,0), (0,1) and (1,1) all have |term| 2, so removing any
    # one leaves a sum of ±2 around −2: (−2 · 3 + 2 · 2) − (∓2) = −2 ± 2, that is 0 or −4, over 6.
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        loss, m = LOSSES["clip-cov"](COV_LOGP, COV_LOGP, COV_ADV, COV_MASK, clip_low=0.2, clip_high=0.2)
        assert m["cov/selected_fraction"].item() == pytest.approx(1 / 6)
        seen.add(round(loss.item() * 6, 4))
    assert seen == {0.0, -4.0}  # both a positive- and a negative-advantage token were drawn


def test_kl_cov_penalises_the_top_covariance_tokens_with_the_absolute_log_ratio():
    # Token ratios [2, 1.5, 1], [0.5, 0.5], [1]; nothing is clipped: −A·r = −4, −3, −2 | +1, +1 | 0.
    # 2 picks (ratio 0.34 of 6 tokens): the largest covariance terms, (1,0) 7.47 and (0,0) 4.5, each
    # plus |log r| = ln 2: −4 + 0.693147 and 1 + 0.693147. Sum −5.613706; token-mean −0.935618.
    ratios = torch.tensor([[2.0, 1.5, 1.0], [0.5, 0.5, 1.0], [1.0, 1.0, 1.0]])
    logp = with_grad(COV_LOGP)
    loss, m = LOSSES["kl-cov"](logp, COV_LOGP - torch.log(ratios), COV_ADV, COV_MASK, kl_cov_ratio=0.34)
    assert loss.item() == pytest.approx(-0.935618, abs=1e-6)
    assert m["cov/selected_fraction"].item() == pytest.approx(2 / 6) and m["clip/fraction"].item() == 0.0
    loss.backward()
    # (0,0): (−A·r + sign(log r)) / 6 = (−4 + 1) / 6; (1,0): (+1 − 1) / 6 = 0, the penalty cancels
    # the push; (0,1), not picked: −3 / 6.
    assert logp.grad[0, 0].item() == pytest.approx(-0.5) and logp.grad[1, 0].item() == pytest.approx(0.0, abs=1e-7)
    assert logp.grad[0, 1].item() == pytest.approx(-0.5)


# ---------------------------------------------------------------------------- off-policy masking


def test_off_policy_masking_drops_negative_sequences_far_from_the_sampler():
    # All ratios e^(−1): mean_t(log π_sampler − log π_θ) = 1 for both sequences (sampler = π_old).
    # δ = 0.5: seq 1 (A = −1) is masked; seq 0 (A = +1) is kept whatever its KL.
    # GRPO (clip 0.2 / 0.27): seq 0's tokens have r = 0.368 < 1 with A > 0, unclipped: −0.368 each,
    # mean −0.367879; seq 1 adds 0 but still counts: loss −0.367879 / 2 = −0.183940.
    logp = OLD - 1.0
    loss, m = LOSSES["grpo"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27, off_policy_mask_threshold=0.5)
    assert loss.item() == pytest.approx(-math.exp(-1) / 2, abs=1e-6)
    assert m["mask/off_policy_fraction"].item() == pytest.approx(0.5)
    # With δ = 1.5 nothing is masked: seq 1 adds −min(−0.368, −0.8) = +0.8 per token.
    loss, m = LOSSES["grpo"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.27, off_policy_mask_threshold=1.5)
    assert loss.item() == pytest.approx((-math.exp(-1) + 0.8) / 2, abs=1e-6)
    assert m["mask/off_policy_fraction"].item() == 0.0
    # token-mean keeps its denominator of 5 tokens: DAPO's loss is seq 0's sum −2 · 0.367879 / 5.
    loss, _ = LOSSES["dapo"](logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28, off_policy_mask_threshold=0.5)
    assert loss.item() == pytest.approx(-2 * math.exp(-1) / 5, abs=1e-6)
    # A sequence loss: GSPO's s_0 = e^(−1) with A = +1 is unclipped, −0.367879; the masked seq 1 adds
    # nothing (not GSPO's term at ratio 1, +0.9997, which its emptied mask would leave): −0.367879 / 2.
    loss, _ = LOSSES["gspo"](logp, OLD, ADV, MASK, off_policy_mask_threshold=0.5)
    assert loss.item() == pytest.approx(-math.exp(-1) / 2, abs=1e-6)


def test_off_policy_masking_measures_the_kl_from_the_samplers_numbers_when_given():
    # π_old = π_θ (ratio 1), but the sampler's numbers are 1 higher on every token: KL = 1 > 0.5, and the
    # negative sequence is masked; without sampler_logp the KL to π_old is 0 and nothing is.
    _, m = LOSSES["gspo"](OLD, OLD, ADV, MASK, off_policy_mask_threshold=0.5, sampler_logp=OLD + 1.0)
    assert m["mask/off_policy_fraction"].item() == pytest.approx(0.5)
    _, m = LOSSES["gspo"](OLD, OLD, ADV, MASK, off_policy_mask_threshold=0.5)
    assert m["mask/off_policy_fraction"].item() == 0.0


# ---------------------------------------------------------------------------- TRL 1.16's own loss code

VESPO_PARAMS = dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
SAPO_PARAMS = dict(tau_pos=1.0, tau_neg=1.05)


def trl_loss(loss_type: str, level: str, logp, old_logp, advantages, mask, *, epsilon_low: float = 0.2,
             epsilon_high: float = 0.2, off_policy_mask_threshold=None, sampler_logp=None):
    """(loss, d loss / d logp) from TRL's `GRPOTrainer._compute_loss`, the trainer's own loss code, with
    the model's forward pass replaced by `logp`: one process, no gradient accumulation, beta = 0."""
    if os.environ.get("GSPO_REQUIRE_TRL"):  # CI (`.ci/run`): a missing TRL fails instead of skipping
        import trl.trainer.grpo_trainer as grpo
    else:
        grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is not installed (the bench extra: "
                                   "pip install -e '.[bench]'); the TRL cross-checks need it")
    trainer = grpo.GRPOTrainer
    batch, width = mask.shape
    policy = logp.clone().requires_grad_(True)
    identity = lambda x, **kwargs: x  # noqa: E731  (gather / reduce over one process)
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, aux_loss_enabled=False, _entropy_bonus_enabled=False, beta=0.0,
        off_policy_mask_threshold=off_policy_mask_threshold, importance_sampling_level=level,
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, max_completion_length=width, current_gradient_accumulation_steps=1,
        get_off_policy_mask=trainer.get_off_policy_mask, get_gamma_weights=trainer.get_gamma_weights,
        args=SimpleNamespace(delta=None, steps_per_generation=1, sapo_temperature_pos=SAPO_PARAMS["tau_pos"],
                             sapo_temperature_neg=SAPO_PARAMS["tau_neg"],
                             **{f"vespo_{name}": value for name, value in VESPO_PARAMS.items()}),
        model=SimpleNamespace(training=True), _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(num_processes=1, gather=identity, reduce=identity, gather_for_metrics=identity),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (policy, torch.zeros_like(policy), None),
    )
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1),
              "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logp, "num_items_in_batch": mask.sum()}
    if sampler_logp is not None:
        inputs["sampling_per_token_logps"] = sampler_logp
    loss = trainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), policy.grad


def ours(name: str, logp, old_logp, advantages, mask, **kwargs):
    policy = logp.clone().requires_grad_(True)
    loss, metrics = LOSSES[name](policy, old_logp, advantages, mask, **kwargs)
    loss.backward()
    return loss.detach(), policy.grad, metrics


def random_batch(seed: int, shift: float = 0.3):
    """6 responses of 7, 1, 4, 7, 2 and 5 tokens; the sampler's numbers off π_old by ~0.2, π_θ off by ~`shift`."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(7)[None] < torch.tensor([7, 1, 4, 7, 2, 5])[:, None]).float()
    old = -3 * torch.rand(6, 7, generator=g) - 0.05
    sampler = old + 0.2 * torch.randn(6, 7, generator=g)
    logp = old + shift * torch.randn(6, 7, generator=g)
    advantages = torch.tensor([1.2, -0.7, 0.0, -1.5, 0.4, -0.3])
    return logp, old, sampler, advantages, mask


# (TRL loss_type, importance_sampling_level, our loss, clip range, our params): each TRL loss whose
# counterpart we have, with that loss's own clip range.
PAIRS = [
    ("luspo", "sequence", "luspo", (3e-4, 4e-4), {}),
    ("vespo", "token", "vespo", (0.2, 0.2), VESPO_PARAMS),
    ("grpo", "sequence", "gspo", (3e-4, 4e-4), {}),
    ("grpo", "token", "grpo", (0.2, 0.27), {}),
    ("dapo", "token", "dapo", (0.2, 0.28), {}),
    ("sapo", "token", "sapo", (0.0, 0.0), SAPO_PARAMS),
]


@pytest.mark.parametrize("threshold", [None, 0.05])
@pytest.mark.parametrize("trl_type, level, name, clip, params", PAIRS, ids=[p[2] for p in PAIRS])
def test_loss_and_gradient_equal_trls(trl_type, level, name, clip, params, threshold):
    """The same log-probabilities, old log-probabilities, sampler log-probabilities, advantages and
    mask through TRL 1.16's loss code and ours: the loss and its gradient agree to 1e-5; with a
    threshold, off-policy sequence masking (TRL's `off_policy_mask_threshold`) is on in both."""
    logp, old, sampler, advantages, mask = random_batch(seed=3)
    masking = {} if threshold is None else {"off_policy_mask_threshold": threshold, "sampler_logp": sampler}
    expected, expected_grad = trl_loss(trl_type, level, logp, old, advantages, mask, epsilon_low=clip[0],
                                       epsilon_high=clip[1], **masking)
    loss, grad, metrics = ours(name, logp, old, advantages, mask, clip_low=clip[0], clip_high=clip[1],
                               **params, **masking)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    assert grad.abs().max() > 1e-3  # a gradient to compare
    if threshold is not None:  # some negative sequences masked, not all
        assert 0 < metrics["mask/off_policy_fraction"].item() < (advantages < 0).float().mean().item()
    if name in ("luspo", "gspo", "grpo", "dapo"):  # the clip acts on both sides
        assert metrics["clip/low_fraction"] > 0 and metrics["clip/high_fraction"] > 0
    if name == "vespo":  # φ spans both sides of 1/2
        assert 0 < metrics["clip/fraction"] < 1
