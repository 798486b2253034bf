"""Every algo option trains the default task a few steps with finite metrics (tiny model, CPU)."""

import json
import math

import pytest
import torch
from conftest import compose_train
from test_train import STEP_METRICS, small_overrides

import gspo_cli.train.model_loading as model_loading
import gspo_cli.train.steps as steps
import gspo_cli.train.update as update
from gspo_cli.algo.losses import LOSSES
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.loop import check_config, train
from gspo_cli.train.steps import old_logp_source

# On CPU in float32 the sampler (KV cache, one token at a time) and the trainer (one full forward
# pass) compute the same log-probabilities up to float rounding, ~1e-6; 1e-4 leaves room for
# other thread counts and BLAS kernels while still catching any real misalignment (a shifted
# position or token gives gaps of order 1).
MISMATCH_TOL = 1e-4


def run(tmp_path, cache_dir, algo, extra=(), steps=2, monkeypatch=None):
    """Train `steps` steps; return the per-step metric records and how many models were loaded."""
    loads = []
    if monkeypatch is not None:
        original = model_loading.load_model
        monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    cfg = compose_train(small_overrides(cache_dir, algo, steps) + ["logger=none", "trainer.save_final=false",
                                                                   *extra])
    train(cfg, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(steps + 1))
    return lines[:steps], len(loads)


def assert_finite(records, names):
    for record in records:
        for name in names:
            assert math.isfinite(record[name]), (name, record)


def assert_no_gap(records):
    for record in records:
        assert record["mismatch/logp_abs_diff"] < MISMATCH_TOL, record
        assert 1.0 <= record["mismatch/seq_ratio_max"] < 1.0 + MISMATCH_TOL, record


@pytest.mark.parametrize("algo", ["dr-grpo", "dapo", "cispo", "sapo", "gmpo", "luspo", "vespo", "icepop", "dppo",
                                  "clip-cov", "kl-cov", "grpo-opsm"])
def test_each_algo_trains_with_finite_metrics(algo, tmp_path, cache_dir):
    records, _ = run(tmp_path, cache_dir, algo)
    extra = {"dapo": ["sampling/informative_fraction", "sampling/refills", "reward/overlong_penalty"],
             "sapo": ["gate/weight_mean"], "gmpo": ["ratio/seq_mean"], "luspo": ["ratio/seq_mean"],
             "vespo": ["gate/seq_weight_mean"], "icepop": ["icepop/masked_fraction", "icepop/weight_mean"],
             "clip-cov": ["cov/selected_fraction"], "kl-cov": ["cov/selected_fraction"],
             "grpo-opsm": ["mask/off_policy_fraction"]}.get(algo, [])
    assert_finite(records, STEP_METRICS + ["loss", "eval/accuracy"] + extra)
    assert_no_gap(records)  # measured on every batch


def dr_grpo_by_hand(logp, old_logp, advantages, mask, num_seqs, horizon):
    # Dr. GRPO (conf/algo/dr-grpo.yaml): PPO's token surrogate, clip 0.2 / 0.27, token losses
    # summed and divided by num_seqs · max response length.
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - 0.2, 1 + 0.27) * a)
    return per_token[mask.bool()].sum() / (num_seqs * horizon)


def cispo_by_hand(logp, old_logp, advantages, mask, num_seqs, horizon):
    # CISPO (conf/algo/cispo.yaml): −min(r, 1.28) · A · log π per token (no lower bound),
    # averaged over the tokens of the batch.
    weight = torch.exp(logp - old_logp).clamp(max=1 + 0.28)
    per_token = -weight * advantages[:, None] * logp
    return per_token[mask.bool()].sum() / mask.sum()


def luspo_by_hand(logp, old_logp, advantages, mask, num_seqs, horizon):
    # LUSPO (conf/algo/luspo.yaml): GSPO's sequence ratio clipped to [1 − 3e-4, 1 + 4e-4], each
    # sequence's loss times its length, summed and divided by the number of sequences.
    lengths = mask.sum(1)
    ratio = torch.exp(((logp - old_logp) * mask).sum(1) / lengths)
    per_seq = -torch.minimum(ratio * advantages, ratio.clamp(1 - 3e-4, 1 + 4e-4) * advantages)
    return (per_seq * lengths).sum() / num_seqs


def dppo_by_hand(logp, old_logp, advantages, mask, num_seqs, horizon):
    # DPPO (conf/algo/dppo.yaml): −A·r on the tokens whose probability did not move past ±0.2 in
    # their advantage's direction, plus 1e-3 (log r)² on every token; averaged over the batch's tokens.
    ratio, a = torch.exp(logp - old_logp), advantages[:, None]
    kept = (~dppo_moved_too_far(logp, old_logp, advantages, mask)).float()
    per_token = -kept * a * ratio + 1e-3 * (logp - old_logp) ** 2
    return per_token[mask.bool()].sum() / mask.sum()


def ratio_outside(low, high):
    """The tokens (with A ≠ 0) whose token ratio leaves [low, high]."""
    def acted(logp, old_logp, advantages, mask):
        ratio = torch.exp(logp - old_logp)
        return mask.bool() & (advantages != 0)[:, None] & ((ratio < low) | (ratio > high))
    return acted


def sequence_ratio_outside(low, high):
    """The tokens of the sequences (with A ≠ 0) whose length-normalised ratio leaves [low, high]."""
    def acted(logp, old_logp, advantages, mask):
        ratio = torch.exp(((logp - old_logp) * mask).sum(1) / mask.sum(1))
        return mask.bool() & ((advantages != 0) & ((ratio < low) | (ratio > high)))[:, None]
    return acted


def dppo_moved_too_far(logp, old_logp, advantages, mask):
    """The tokens whose probability moved past 0.2 in their advantage's direction."""
    change, a = torch.exp(logp) - torch.exp(old_logp), advantages[:, None]
    return mask.bool() & (((a > 0) & (change > 0.2)) | ((a < 0) & (change < -0.2)))


@pytest.mark.parametrize("algo, by_hand, acted", [
    ("dr-grpo", dr_grpo_by_hand, ratio_outside(1 - 0.2, 1 + 0.27)),  # where the formula's clip acts
    ("cispo", cispo_by_hand, ratio_outside(0.0, 1 + 0.28)),
    ("luspo", luspo_by_hand, sequence_ratio_outside(1 - 3e-4, 1 + 4e-4)),
    ("dppo", dppo_by_hand, dppo_moved_too_far),
])
def test_algo_runs_its_own_loss_clip_range_and_aggregation(algo, by_hand, acted, tmp_path, cache_dir, monkeypatch):
    """Every mini-batch loss of a 2-step run equals the algorithm's formula worked out here,
    with its own clip range and normalisation, on the inputs the trainer passed (π_old moved
    on two rows in three, so that ratios leave the clip range)."""
    calls, registered = [], LOSSES[algo]

    def spy(logp, old_logp, advantages, mask, **kwargs):
        # π_old +0.4, 0, −0.4 nats, row after row: ratios ×0.67, ×1, ×1.49 leave the clip range on
        # both sides by construction. Left to the run, how far it goes depends on the trajectory,
        # and so on the float path: with AVX2 kernels no ratio left it (issue 29).
        old_logp = old_logp + torch.tensor([0.4, 0.0, -0.4]).repeat(len(advantages))[:len(advantages), None]
        loss, metrics = registered(logp, old_logp, advantages, mask, **kwargs)
        calls.append((logp.detach(), old_logp, advantages, mask, kwargs, loss.detach()))
        return loss, metrics

    monkeypatch.setitem(LOSSES, algo, spy)
    run(tmp_path, cache_dir, algo)
    assert len(calls) == 2 * 4  # 2 steps × 4 mini-batches
    outside = 0
    for logp, old_logp, advantages, mask, kwargs, loss in calls:
        expected = by_hand(logp, old_logp, advantages, mask, kwargs["num_seqs"], kwargs["horizon"])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
        outside += int(acted(logp, old_logp, advantages, mask).sum())
    assert outside > 0  # the clip (or mask) acted on some tokens: it shaped the values compared


def test_advantage_kl_and_tis_options_train(tmp_path, cache_dir, monkeypatch):
    records, loads = run(tmp_path, cache_dir, "grpo", monkeypatch=monkeypatch, extra=[
        "algo.adv_baseline=rloo", "algo.adv_scale=batch-std", "algo.kl_coef=0.05", "algo.kl_estimator=k2",
        "algo.tis_cap=2.0"])
    assert loads == 2  # the policy and, because kl_coef != 0, the frozen reference
    assert_finite(records, STEP_METRICS + ["loss", "kl/ref"])
    assert all(r["kl/ref"] >= 0.0 for r in records)  # k2 is a square
    assert_no_gap(records)


@pytest.mark.parametrize("mode, fraction", [("tis-seq", "correction/truncated_fraction"),
                                            ("mis-token", "correction/masked_fraction")])
def test_rollout_correction_modes_train_and_log_what_they_cut(tmp_path, cache_dir, monkeypatch, mode, fraction):
    """A run whose sampler and trainer differ cuts some ratios, and logs the share it cut.

    Under bf16 the sampler (KV cache, one token at a time) and the trainer (one full pass) round
    differently, on both sides: |Δ log p| averaged 2.5e-3 in step 1 when this test was written
    (~0.1 in step 2, after a step at lr 1e-2). A cap of 1.001 with its lower bound 1/1.001 then
    cuts some ratios (a third of the tokens in step 1), not all.
    """
    calls, original = [], update.importance_weights

    def spy(train_logp, sampler_logp, mask, *args, **kwargs):
        weights, metrics = original(train_logp, sampler_logp, mask, *args, **kwargs)
        calls.append((train_logp - sampler_logp, mask.bool(), weights, metrics))
        return weights, metrics

    monkeypatch.setattr(update, "importance_weights", spy)
    cap = 1.001
    records, _ = run(tmp_path, cache_dir, "gspo", [
        f"algo.rollout_correction={mode}", f"algo.rollout_correction_cap={cap}", "algo.old_logp=recompute",
        "hardware.precision=bf16"])
    assert_finite(records, STEP_METRICS + ["loss", "correction/weight_mean", fraction])
    assert len(calls) == 2 * 4  # 2 steps × 4 mini-batches, one micro-batch each
    for step, record in enumerate(records):
        shares = []
        for log_ratio, real, weights, metrics in calls[4 * step:4 * step + 4]:
            # What was cut, from the log-ratios alone: tis-seq truncates whole sequences whose
            # product of token ratios exceeds the cap, to the cap; mis-token zeroes tokens outside [1/C, C].
            if mode == "tis-seq":
                seq = torch.where(real, log_ratio, 0.0).sum(1, keepdim=True).exp().expand_as(real)
                cut = real & (seq > cap)
                assert torch.allclose(weights[cut], torch.tensor(cap))
            else:
                ratio = log_ratio.exp()
                cut = real & ((ratio > cap) | (ratio < 1 / cap))
                assert (weights[cut] == 0).all() and (weights[real & ~cut] > 0).all()
            share = cut.sum().item() / real.sum().item()
            assert metrics[fraction].item() == pytest.approx(share)
            shares.append(share)
        assert record[fraction] > 0.0
        assert record[fraction] == pytest.approx(sum(shares) / len(shares))  # the mean over mini-batches
    if mode == "mis-token":  # both tails were cut, and the parts add up to the whole
        assert all(r["correction/masked_fraction_low"] > 0 and r["correction/masked_fraction_high"] > 0
                   for r in records)
        assert all(r["correction/masked_fraction_low"] + r["correction/masked_fraction_high"]
                   == pytest.approx(r[fraction]) for r in records)


def test_rollout_log_probs_as_pi_old(tmp_path, cache_dir, monkeypatch):
    records, loads = run(tmp_path, cache_dir, "gspo", ["algo.old_logp=rollout"], monkeypatch=monkeypatch)
    assert loads == 1  # kl_coef = 0: no reference model
    assert "kl/ref" not in records[0]
    assert_finite(records, STEP_METRICS + ["loss", "mismatch/logp_abs_diff", "mismatch/seq_ratio_max"])
    assert_no_gap(records)


@pytest.mark.parametrize("overrides, source", [
    ([], "rollout"),  # fp32: the sampler's numbers are the trainer's own
    (["algo.old_logp=recompute"], "recompute"),
    (["hardware.precision=bf16"], "recompute"),  # the KV-cache path rounds differently under bf16
    (["model.dtype=bfloat16"], "recompute"),
    (["algo.tis_cap=2.0"], "recompute"),  # TIS corrects a recomputed π_old
    (["trainer.top_p=0.9"], "recompute"),  # the sampler reports the truncated distribution's numbers
    (["trainer.top_k=5"], "recompute"),
    (["algo.old_logp=rollout", "hardware.precision=bf16"], "rollout"),  # an explicit choice stands
])
def test_auto_old_logp_uses_the_sampler_only_when_it_computes_like_the_trainer(cache_dir, overrides, source):
    assert old_logp_source(compose_train(small_overrides(cache_dir) + overrides)) == source


def test_auto_old_logp_skips_the_recomputation_and_measures_the_gap(tmp_path, cache_dir, monkeypatch):
    def no_recomputation(*args, **kwargs):
        raise AssertionError("algo.old_logp=auto recomputed π_old in float32")

    monkeypatch.setattr(steps, "old_logprobs", no_recomputation)
    records, _ = run(tmp_path, cache_dir, "gspo", monkeypatch=monkeypatch)
    assert all(r["time/old_logp_s"] < 0.01 for r in records)
    assert_no_gap(records)  # measured between the sampler and the first, on-policy mini-batch


def test_sequence_ratio_with_token_sum_warns_once_and_trains(tmp_path, cache_dir):
    with pytest.warns(UserWarning, match="weighted by its length") as caught:
        records, _ = run(tmp_path, cache_dir, "gspo", ["algo.loss_agg=seq-mean-token-sum"])
    assert sum("weighted by its length" in str(w.message) for w in caught) == 1
    assert_finite(records, ["loss", "clip/fraction"])


def test_bad_algo_options_fail_before_training(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        train(compose_train(small_overrides(cache_dir) + ["algo.loss_agg=sum"]), tmp_path / "a")
    with pytest.raises(ValueError, match="old_logp=recompute"):
        train(compose_train(small_overrides(cache_dir) + ["algo.old_logp=rollout", "algo.tis_cap=2"]), tmp_path / "b")
    recompute = ["algo.old_logp=recompute"]
    with pytest.raises(ValueError, match="lower bound of the masked modes"):
        train(compose_train(small_overrides(cache_dir) + recompute + [
            "algo.rollout_correction=tis-token", "algo.rollout_correction_cap_low=0.5"]), tmp_path / "c")
    with pytest.raises(ValueError, match="band empty"):
        train(compose_train(small_overrides(cache_dir) + recompute + [
            "algo.rollout_correction=mis-geo", "algo.rollout_correction_cap=1.5",
            "algo.rollout_correction_cap_low=2"]), tmp_path / "d")
    # cap_low=0 (no floor, AReaL's behav_imp_weight_cap) is a band, also with the cap at 1, where 1/C is not
    check_config(compose_train(small_overrides(cache_dir) + recompute + [
        "algo.rollout_correction=mis-token", "algo.rollout_correction_cap=1.0", "algo.rollout_correction_cap_low=0"]),
        DistEnv())


def test_icepop_masks_the_tokens_on_which_sampler_and_trainer_disagree(tmp_path, cache_dir, monkeypatch):
    """With top-k sampling the sampler reports the truncated distribution's probabilities and the
    trainer the full one's, so k = π_old / π_sampler is the top-k mass of each step (≤ 1): the
    tokens where it is below IcePop's α = 0.5 are masked, every mini-batch, as the formula says."""
    calls, registered = [], LOSSES["icepop"]

    def spy(logp, old_logp, advantages, mask, **kwargs):
        loss, metrics = registered(logp, old_logp, advantages, mask, **kwargs)
        calls.append((old_logp, kwargs.get("sampler_logp"), mask, metrics))
        return loss, metrics

    monkeypatch.setitem(LOSSES, "icepop", spy)
    run(tmp_path, cache_dir, "icepop", ["trainer.top_k=2"])
    if calls[0][1] is None:
        pytest.skip("the trainer does not pass the sampler's log-probabilities to the loss yet "
                    "(sampler_logp in train/update.py's minibatch_loss; docs/algorithms.md, IcePop)")
    masked = 0.0
    for old_logp, sampler_logp, mask, metrics in calls:
        k = torch.exp(old_logp - sampler_logp)
        assert bool((k[mask.bool()] <= 1 + 1e-5).all())  # the top-2 mass
        expected = ((k < 0.5) & mask.bool()).sum() / mask.sum()
        assert metrics["icepop/masked_fraction"].item() == pytest.approx(expected.item(), abs=1e-6)
        masked += expected.item()
    assert masked > 0  # some tokens were masked: the band shaped the losses compared
