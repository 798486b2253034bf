"""The rollout engines (`trainer.rollout_engine`) hand the trainer the same `Rollout`: the
continuous-batching engine stops at the model's end tokens and at stop strings where the
built-in sampler does, reports the log-probabilities the trainer recomputes (fp32, within
1e-5: the two compute attention with other kernels), those of the truncated distribution under
top-k/top-p, gives the same rollout for the same seed, and is refused where it cannot serve."""

import json

import pytest
import torch
from conftest import compose_train
from test_real_checkpoint import chat_overrides

from gspo_cli.data.tasks import build_task
from gspo_cli.models.loading import load_model, load_tokenizer
from gspo_cli.rollout.continuous import prompt_runs
from gspo_cli.rollout.engines import engine_conflicts, sample_rollout
from gspo_cli.rollout.generate import filter_logits
from gspo_cli.rollout.scoring import positions_from_mask, response_logprobs
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.loop import check_config, train

# fp32 on both sides; the engine's paged attention sums in another order than the trainer's pass.
LOGP_ATOL = 1e-5
PROMPTS = ["1+2=", "40+59=", "7*8="]


def sampled(engine, model, tokenizer, prompts, seed=1, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return sample_rollout(engine, model, tokenizer, prompts, kwargs.pop("max_new_tokens", 12),
                          kwargs.pop("temperature", 0.7), generator, **kwargs)


def trainer_logits(model, rollout):
    """[N, T, V] the trainer's full-pass logits at the positions that predict each response token."""
    T = rollout.response_mask.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=positions_from_mask(rollout.attention_mask))
    return out.logits[:, -T - 1:-1].float()


def test_prompt_runs_finds_groups_only_when_every_prompt_repeats_equally():
    assert prompt_runs(["a", "a", "b", "b"]) == (["a", "b"], 2)
    assert prompt_runs(["a", "b"]) == (["a", "b"], 1)
    assert prompt_runs(["a", "a", "b"]) == (["a", "a", "b"], 1)  # unequal runs: one request each
    assert prompt_runs(["a", "b", "a", "b"]) == (["a", "b", "a", "b"], 1)


def test_greedy_continuous_decodes_what_the_builtin_sampler_decodes(real_checkpoint_dir):
    # The chat checkpoint ends its turns at <|im_end|>, the first id of its generation config's list.
    model, tokenizer = load_model(real_checkpoint_dir), load_tokenizer(real_checkpoint_dir)
    task = build_task(compose_train(chat_overrides(real_checkpoint_dir)).task)
    prompts = [p.prompt for p in task.eval[:8]]
    builtin = sampled("builtin", model, tokenizer, prompts, temperature=0.0, max_new_tokens=24)
    engine = sampled("continuous", model, tokenizer, prompts, temperature=0.0, max_new_tokens=24)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lengths, T = builtin.response_mask.sum(1).long(), builtin.response_mask.shape[1]
    assert (lengths < 24).all() and (builtin.input_ids[torch.arange(8), -T + lengths - 1] == im_end).all()
    assert torch.equal(engine.input_ids, builtin.input_ids)
    assert torch.equal(engine.attention_mask, builtin.attention_mask)
    assert torch.equal(engine.response_mask, builtin.response_mask)
    assert torch.equal(engine.truncated, builtin.truncated) and not engine.truncated.any()
    assert engine.completions == builtin.completions
    mask = builtin.response_mask  # the built-in sampler leaves values after the end, to be ignored
    assert torch.allclose(engine.logp * mask, builtin.logp * mask, atol=LOGP_ATOL)


def test_sampled_rows_carry_the_log_probabilities_the_trainer_recomputes(tiny_model):
    model, tokenizer = tiny_model
    prompts = [p for p in PROMPTS for _ in range(4)]  # groups of 4: one prefill each
    rollout = sampled("continuous", model, tokenizer, prompts, max_new_tokens=12)
    mask = rollout.response_mask
    N, T = mask.shape
    lengths = mask.sum(1).long()
    assert torch.equal(mask, (torch.arange(T)[None] < lengths[:, None]).float())  # contiguous from the start
    assert (rollout.input_ids[:, -T:][mask == 0] == tokenizer.pad_token_id).all()
    ended = rollout.input_ids[torch.arange(N), -T + lengths - 1] == tokenizer.eos_token_id
    assert torch.equal(rollout.truncated, ~ended & (lengths == 12))
    recomputed = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, temperature=0.7)
    assert (rollout.logp * mask).abs().sum() > 0
    assert torch.allclose(rollout.logp * mask, recomputed * mask, atol=LOGP_ATOL)
    assert torch.equal(rollout.entropy, -rollout.logp)  # the drawn token's surprisal estimates the entropy


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6)])
def test_top_k_and_top_p_report_the_truncated_distribution(tiny_model, top_k, top_p):
    model, tokenizer = tiny_model
    rollout = sampled("continuous", model, tokenizer, PROMPTS * 4, top_k=top_k, top_p=top_p)
    mask = rollout.response_mask.bool()
    kept = filter_logits(trainer_logits(model, rollout).flatten(0, 1) / 0.7, top_k, top_p)
    logp = kept.log_softmax(-1).view(*mask.shape, -1)
    tokens = rollout.input_ids[:, -mask.shape[1]:]
    drawn = logp.gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.isfinite(drawn[mask]).all()  # every drawn token is inside the kept set
    assert torch.allclose(rollout.logp[mask], drawn[mask], atol=LOGP_ATOL)


def test_the_same_seed_gives_the_same_rollout_and_another_seed_another(tiny_model):
    model, tokenizer = tiny_model
    before = torch.random.get_rng_state()
    first, again = (sampled("continuous", model, tokenizer, PROMPTS * 4, seed=3) for _ in range(2))
    other = sampled("continuous", model, tokenizer, PROMPTS * 4, seed=4)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.logp, again.logp)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left as it was


def test_stop_strings_end_responses_where_the_builtin_sampler_ends_them(tiny_model):
    model, tokenizer = tiny_model
    free = sampled("builtin", model, tokenizer, PROMPTS, temperature=0.0, max_new_tokens=10)
    stop = free.completions[0][3]  # a character greedy decoding writes a few tokens in
    builtin = sampled("builtin", model, tokenizer, PROMPTS, temperature=0.0, max_new_tokens=10, stop_strings=[stop])
    engine = sampled("continuous", model, tokenizer, PROMPTS, temperature=0.0, max_new_tokens=10, stop_strings=[stop])
    assert builtin.response_mask.sum() < free.response_mask.sum()  # the stop string cut something
    assert torch.equal(engine.response_mask, builtin.response_mask)
    assert torch.equal(engine.input_ids, builtin.input_ids)
    assert torch.equal(engine.truncated, builtin.truncated) and engine.completions == builtin.completions


def test_routing_replay_from_the_sampler_and_fsdp_are_refused_with_the_engine_that_serves_them():
    replay = compose_train(["trainer.rollout_engine=continuous", "algo=grpo-replay", "algo.old_logp=rollout"])
    with pytest.raises(ValueError, match="rollout_engine=builtin"):
        check_config(replay, DistEnv())
    recomputed = compose_train(["trainer.rollout_engine=continuous", "algo=grpo-replay"])
    check_config(recomputed, DistEnv())  # replays the recomputed π_old's experts: fine
    fsdp = compose_train(["trainer.rollout_engine=continuous", "hardware.strategy=fsdp"])
    with pytest.raises(ValueError, match="rollout_engine=builtin"):
        check_config(fsdp, DistEnv(rank=0, world_size=2))
    assert "not one of" in engine_conflicts("vllm", False, False)


def test_a_run_with_the_continuous_engine_trains_and_logs_the_gap_to_the_trainer(tmp_path, tiny_model_dir):
    cfg = compose_train(["trainer.rollout_engine=continuous", "model=local", f"model.path={tiny_model_dir}",
                         "trainer.max_steps=2", "trainer.eval_every=2", "trainer.prompts_per_step=4",
                         "trainer.group_size=4", "trainer.max_new_tokens=6", "task.num_eval=8", "logger=none"])
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[:2]:
        assert record["mismatch/logp_abs_diff"] < LOGP_ATOL  # π_old recomputed (auto), compared with the engine's
        assert record["response_length/mean"] > 0
    assert 0.0 <= records[-1]["eval/accuracy"] <= 1.0


def test_gspo_eval_with_the_continuous_engine_scores_what_the_builtin_engine_scores(tmp_path, real_checkpoint_dir,
                                                                                     monkeypatch):
    import gspo_cli.rollout.continuous as continuous
    from test_evaluate import eval_job

    calls = []
    engine_call = continuous.continuous_rollout
    monkeypatch.setattr(continuous, "continuous_rollout", lambda *a, **k: calls.append(1) or engine_call(*a, **k))

    common = [f"checkpoint={real_checkpoint_dir}", "task.max_operand=9", "task.num_eval=20", "task.chat_template=true",
              "eval.k=2", "eval.n=2", "eval.temperature=0", "eval.max_new_tokens=12", "logger=none"]
    builtin = eval_job(common, tmp_path / "builtin")[0]["metrics"]
    assert not calls
    engine = eval_job(common + ["eval.rollout_engine=continuous"], tmp_path / "continuous")[0]["metrics"]
    assert len(calls) == 2  # the greedy pass and the sampled one
    assert 0 < builtin["eval/accuracy"] < 1
    assert engine == pytest.approx(builtin)  # greedy: the same responses, so the same figures
