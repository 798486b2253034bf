"""Precision: float32 master weights and AdamW state under bf16 compute, float32 log-probabilities."""

import torch
from conftest import compose_train
from test_train import small_overrides

from gspo_cli.rollout.generate import generate_rollout
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.loop import config_pitfalls, make_context, setup
from gspo_cli.train.precision import autocast
from gspo_cli.train.steps import collect_rollout
from gspo_cli.train.update import update_policy


def test_logprobs_come_from_float32_logits_under_bf16_autocast(tiny_model):
    """Under bf16 autocast the decoder computes in bf16, but the output projection of the
    log-probability head runs in float32: log π equals log_softmax(float32(h) @ float32(W))
    of the final hidden states h, to float32 rounding. The plain bf16 projection is off by up
    to ~1e-3 on this tiny model, more than GSPO's whole clip range (4e-4)."""
    model, tokenizer = tiny_model
    rollout = generate_rollout(model, tokenizer, ["1+2=", "7+7=", "40+59="], 6, 1.0, torch.Generator().manual_seed(0))
    T = rollout.response_mask.shape[1]
    normed = []
    hook = model.model.norm.register_forward_hook(lambda module, args, out: normed.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, 1.0, chunk_tokens=12)
        bf16_logits = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, 1.0, chunk_tokens=0)
    hook.remove()
    hidden = normed[0][:, -T - 1:-1].float()
    weight = model.get_output_embeddings().weight.float()
    reference = torch.log_softmax(hidden @ weight.T, -1).gather(-1, rollout.input_ids[:, -T:, None]).squeeze(-1)
    mask = rollout.response_mask.bool()
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked[mask], reference[mask], atol=1e-5)
    assert (bf16_logits - reference)[mask].abs().max() > 4e-4


def test_bf16_compute_keeps_float32_master_weights_and_adam_state(tmp_path, cache_dir):
    cfg = compose_train(small_overrides(cache_dir) + ["hardware.precision=bf16", "algo.old_logp=auto"])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    computed = set()
    hook = policy.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: computed.add(out.dtype))
    with autocast("cpu", "bf16", "ddp", False):
        batch, _ = collect_rollout(policy, ctx, state.stream)
        metrics = update_policy(policy, state.optimizer, state.scheduler, batch, ctx)
    hook.remove()
    assert computed == {torch.bfloat16}  # the matmuls ran in bf16
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    moments = [s[k] for s in state.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert batch.old.logp.dtype == torch.float32
    # π_old recomputed under bf16 (auto): the sampler/trainer gap is the bf16 noise floor, > 0.
    assert metrics["mismatch/seq_ratio_max"] > 1.0 and metrics["mismatch/logp_abs_diff"] > 0


def test_real_checkpoint_presets_load_float32_masters_and_low_precision_weights_warn(cache_dir):
    for model in ("qwen3-0.6b", "qwen3-moe"):
        assert compose_train([f"model={model}"]).model.dtype == "float32"
    assert not config_pitfalls(compose_train([]))
    warned = config_pitfalls(compose_train(["model.dtype=bfloat16"]))
    assert len(warned) == 1 and "no float32 master" in warned[0] and "hardware.precision=bf16" in warned[0]


def test_auto_recomputes_pi_old_under_bf16(cache_dir):
    from gspo_cli.train.steps import old_logp_source

    assert old_logp_source(compose_train(small_overrides(cache_dir) + ["hardware.precision=bf16"])) == "recompute"
