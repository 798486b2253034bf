"""LoRA through `peft` (`models/lora.py`): only the adapters train, the reference is the policy with
its adapters off, routing hooks see through the wrapper, the merged export is the adapted model,
and a SIGKILLed LoRA run resumes exactly."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TEST_SPEC, compose_train
from dist_workers import one_update, sharded_save_worker, update_worker, with_adapters
from safetensors.torch import load_file
from test_dist import free_port, global_batch  # noqa: F401 (a fixture)
from test_resume import KILLED_IN_STEP_3, command, env, metrics
from test_train import small_overrides
from transformers import AutoModelForCausalLM

from gspo_cli.cli import main as gspo
from gspo_cli.config import LoraAdapterConfig
from gspo_cli.evaluate import resolve_checkpoint
from gspo_cli.models.loading import load_model, load_tokenizer
from gspo_cli.models.lora import AdaptersOff, add_adapters, base_model_path, load_adapters, trainable_parameters
from gspo_cli.models.routing import MoERouting
from gspo_cli.rollout.generate import encode_prompts
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.checkpoint import latest_checkpoint, load_sharded_model, load_trainer_state
from gspo_cli.train.loop import train

T = 3  # response tokens scored: the last three of each prompt


def adapted(model_dir, train_router=False, seed=0):
    """The tiny MoE under fresh adapters whose B factors (and router copies) are made non-zero,
    so the adapted model differs from the base (fresh adapters start equal to it, B = 0)."""
    model = add_adapters(load_model(model_dir), LoraAdapterConfig(rank=4, train_router=train_router), seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "modules_to_save" in name):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture
def batch(tiny_model_dir):
    return encode_prompts(load_tokenizer(tiny_model_dir), ["1+2=3", "40+59=99", "7+7=14"], "cpu")


def test_reference_with_adapters_off_is_the_base_model(tiny_model_dir, batch):
    ids, mask = batch
    policy = adapted(tiny_model_dir, train_router=True)
    base = load_model(tiny_model_dir).eval()  # what a frozen-copy reference would load
    with torch.no_grad():
        expected = response_logprobs(base, ids, mask, T, chunk_tokens=4)
        reference = response_logprobs(AdaptersOff(policy), ids, mask, T, chunk_tokens=4)
        moved = response_logprobs(policy, ids, mask, T, chunk_tokens=4)
    # the same weights and kernels; peft's wrappers order a few float32 sums differently (~5e-7 seen)
    assert torch.allclose(reference, expected, rtol=0, atol=2e-6)
    assert not torch.allclose(moved, expected, atol=1e-3)  # the adapters (and router copies) are on otherwise


def test_only_adapters_and_named_routers_are_trainable(tiny_model_dir):
    policy = add_adapters(load_model(tiny_model_dir), LoraAdapterConfig(rank=4, train_router=True), seed=0)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or ".modules_to_save." in n for n in names)
    # q, k, v, o and the two fused expert weights, A and B each, plus one router copy, per layer
    assert len(names) == TEST_SPEC.num_hidden_layers * (6 * 2 + 1)
    assert len(trainable_parameters(policy)) == len(names)


def test_routing_hooks_and_replay_work_through_the_wrapper(tiny_model_dir, batch):
    ids, mask = batch
    policy = adapted(tiny_model_dir, train_router=True)
    routing = MoERouting(policy)
    assert routing.num_layers == TEST_SPEC.num_hidden_layers  # the trainable router copies, once per layer
    with torch.no_grad(), routing.capture() as own:
        natural = response_logprobs(policy, ids, mask, T)
    own = list(own)
    assert all(r.numel() > 0 for r in own)  # the routers that ran are the hooked ones
    with torch.no_grad(), routing.replay(own):
        assert torch.allclose(response_logprobs(policy, ids, mask, T), natural, atol=1e-6)
    other = [(r + 1) % TEST_SPEC.num_experts for r in own]
    with torch.no_grad(), routing.replay(other):
        assert not torch.allclose(response_logprobs(policy, ids, mask, T), natural, atol=1e-4)


def test_merged_export_loads_with_from_pretrained_and_matches_the_adapted_model(tiny_model_dir, batch, tmp_path):
    ids, mask = batch
    policy = adapted(tiny_model_dir)
    policy.save_pretrained(tmp_path / "final")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "final")
    assert base_model_path(tmp_path / "final") == str(tiny_model_dir)
    gspo(["export", str(tmp_path / "final"), "--out", str(tmp_path / "merged")])

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # transformers alone, no peft
    assert not any("lora" in n for n in merged.state_dict())
    evaluated = load_model(tmp_path / "final").eval()  # what `gspo eval` loads for an adapter directory
    with torch.no_grad():
        expected = response_logprobs(policy, ids, mask, T)
        assert not torch.allclose(expected, response_logprobs(load_model(tiny_model_dir), ids, mask, T), atol=1e-3)
        assert torch.allclose(response_logprobs(merged, ids, mask, T), expected, atol=1e-5)
        assert torch.allclose(response_logprobs(evaluated, ids, mask, T), expected, atol=1e-5)


def test_lora_run_trains_only_the_adapters_and_saves_them_alone(tmp_path, cache_dir):
    """Two RL steps of GRPO with Routing Replay, a KL penalty and trainable routers under LoRA."""
    cfg = compose_train(small_overrides(cache_dir, "grpo-replay") + [
        "model.lora.rank=4", "model.lora.train_router=true", "algo.kl_coef=0.05", "logger=none",
        "trainer.save_every=1"])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(lines[0][k]) for k in ("loss", "kl/ref", "routing/changed_fraction", "grad_norm"))

    final, checkpoint = run_dir / "checkpoints" / "final", run_dir / "checkpoints" / "step_1" / "model"
    for saved in (final, checkpoint):  # the adapters only, in peft's format
        assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()
    assert resolve_checkpoint(str(run_dir)) == str(final)  # `gspo eval checkpoint=<run>` scores the adapters
    assert len(load_file(final / "adapter_model.safetensors")) == TEST_SPEC.num_hidden_layers * 13  # 12 factors, 1 router
    base = base_model_path(final)
    start = dict(add_adapters(load_model(base), cfg.model.lora, cfg.seed).named_parameters())
    trained = dict(load_adapters(load_model(base), final, trainable=True).named_parameters())
    assert trained.keys() == start.keys()
    for name, value in trained.items():  # every adapter factor and router copy moved, the rest is the base
        assert torch.equal(value, start[name]) != value.requires_grad, name
    # the optimizer held the adapters and the router copies, nothing else
    optimizer = load_trainer_state(checkpoint.parent)["optimizer"]
    assert len(optimizer["param_groups"][0]["params"]) == sum(p.requires_grad for p in trained.values())


# ---------------------------------------------------------------------------- two processes, SIGKILL


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_adapters_give_the_single_process_update(strategy, tmp_path, tiny_model_dir,
                                                                     global_batch):
    metrics, params, _ = one_update(str(tiny_model_dir), torch.load(global_batch), strategy, lora_rank=4)
    out = tmp_path / "two.pt"
    mp.spawn(update_worker, args=(2, free_port(), str(tiny_model_dir), str(global_batch), strategy, str(out),
                                  "gspo", "seq-mean-token-mean", 4), nprocs=2, join=True)
    two = torch.load(out)
    assert two["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=0, abs=1e-6)  # as in test_dist: ~1e-8
    before = dict(with_adapters(load_model(tiny_model_dir), 4).state_dict())
    assert two["params"].keys() == before.keys()
    for name, value in params.items():
        step, two_step = value - before[name], two["params"][name] - before[name]
        if "lora_" not in name:  # the base model is frozen on every process
            assert step.abs().max() == 0 and two_step.abs().max() == 0, name
            continue
        assert step.abs().max() > 0, name  # every adapter factor moved ...
        assert (two_step - step).norm() <= 1e-4 * step.norm(), name  # ... by the same step on two processes


def test_sharded_checkpoint_with_adapters_holds_them_alone_and_loads_in_one_process(tmp_path, tiny_model_dir):
    import torch.distributed.checkpoint as dcp

    mp.spawn(sharded_save_worker, args=(2, free_port(), str(tiny_model_dir), str(tmp_path), 4), nprocs=2, join=True)
    checkpoint = latest_checkpoint(tmp_path)
    saved = dcp.FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    assert all("lora_" in key for key in saved if key.startswith("model."))  # no frozen base weight saved again
    model = with_adapters(load_model(tiny_model_dir), 4)
    load_sharded_model(model, checkpoint)  # the base from its directory, the adapters from the shards
    start = dict(with_adapters(load_model(tiny_model_dir), 4).named_parameters())
    for name, value in model.named_parameters():
        assert torch.allclose(value, start[name] + (0.01 if value.requires_grad else 0.0), atol=1e-6), name


def training_metrics(run_dir):
    """The logged records without the timings and the process's peak memory (its own, not the run's)."""
    return [{k: v for k, v in r.items() if not k.startswith("memory/")} for r in metrics(run_dir)]


@pytest.mark.slow  # three 6-step runs in fresh processes: ~50 s on 2 cores (90 s with the warm start)
def test_sigkill_then_resume_with_adapters_logs_exactly_the_uninterrupted_metrics(tmp_path, cache_dir):
    lora = ("model.lora.rank=4", "algo.kl_coef=0.05")
    straight = tmp_path / "straight"
    done = subprocess.run(command(cache_dir, straight, *lora), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    args = command(cache_dir, killed, *lora)[3:]  # after `python -m gspo_cli`
    crashed = subprocess.run([sys.executable, "-c", KILLED_IN_STEP_3, *args], env=env(), capture_output=True,
                             text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_2"]
    assert (killed / "checkpoints" / "step_2" / "model" / "adapter_config.json").exists()

    resumed = subprocess.run(command(cache_dir, killed, *lora, "resume=auto"), env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    # Exact by construction, as in test_resume.py: the same kernels on the state restored bit for bit.
    assert training_metrics(killed) == training_metrics(straight)
    assert metrics(straight)[1]["kl/ref"] > 0  # the adapters moved the policy away from the reference
