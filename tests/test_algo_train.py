"""Every algo option trains the default task a few steps with finite metrics (tiny model, CPU)."""

import json
import math

import pytest
import torch
from conftest import compose_train
from test_train import STEP_METRICS, small_overrides

import gspo_cli.train.model_loading as model_loading
import gspo_cli.train.steps as steps
from gspo_cli.algo.losses import LOSSES
from gspo_cli.train.loop import train
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


@pytest.mark.parametrize("algo", ["dr-grpo", "dapo", "cispo", "sapo", "gmpo"])
def test_each_algo_trains_with_finite_metrics(algo, tmp_path, cache_dir):
    records, _ = run(tmp_path, cache_dir, algo)
    extra = {"dapo": ["sampling/informative_fraction", "sampling/refills", "reward/overlong_penalty"],
             "sapo": ["gate/weight_mean"], "gmpo": ["ratio/seq_mean"]}.get(algo, [])
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


@pytest.mark.parametrize("algo, by_hand, kept", [
    ("dr-grpo", dr_grpo_by_hand, (1 - 0.2, 1 + 0.27)),  # the ratio range the formula leaves unclipped
    ("cispo", cispo_by_hand, (0.0, 1 + 0.28)),
])
def test_algo_runs_its_own_loss_clip_range_and_aggregation(algo, by_hand, kept, tmp_path, cache_dir, monkeypatch):
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
        ratio = torch.exp(logp - old_logp)
        counted = mask.bool() & (advantages != 0)[:, None]  # tokens whose ratio reaches the loss
        outside += int((counted & ((ratio < kept[0]) | (ratio > kept[1]))).sum())
    assert outside > 0  # some ratios left the clip range: the range shaped the values compared


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
    records, _ = run(tmp_path, cache_dir, "gspo", [f"algo.rollout_correction={mode}", "algo.old_logp=recompute"],
                     monkeypatch=monkeypatch)
    assert_finite(records, STEP_METRICS + ["loss", "correction/weight_mean", fraction])
    # float32 on CPU: the sampler and the trainer agree to ~1e-7, so nothing is cut and the weights are ~1.
    assert all(r[fraction] == 0.0 and r["correction/weight_mean"] == pytest.approx(1.0, abs=1e-4) for r in records)


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
