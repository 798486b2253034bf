"""Code that runs inside the processes of the distributed tests (spawned, gloo on CPU)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from gspo_cli.config import LoraAdapterConfig, TrainConfig
from gspo_cli.models.loading import load_model
from gspo_cli.models.lora import add_adapters, trainable_parameters
from gspo_cli.rollout.generate import Rollout
from gspo_cli.train.distributed import init_distributed, shutdown, wrap_model
from gspo_cli.train.steps import Batch, OldPolicy, StepContext, reduce_over_ranks
from gspo_cli.train.update import update_policy


def batch_rows(data: dict, rows: slice) -> Batch:
    """A `Batch` made of some rows of the saved global batch."""
    rollout = Rollout(input_ids=data["input_ids"][rows], attention_mask=data["attention_mask"][rows],
                      response_mask=data["response_mask"][rows], completions=[""] * len(data["rewards"][rows]),
                      logp=data["old_logp"][rows], entropy=data["entropy"][rows])
    num_seqs = len(data["rewards"][rows])
    return Batch(rollout, data["rewards"][rows], data["advantages"][rows], data["entropy"][rows],
                 order=torch.arange(num_seqs), old=OldPolicy(torch.arange(num_seqs), data["old_logp"][rows]))


def with_adapters(model, rank: int):
    """The model under LoRA adapters of `rank` whose B factors are made non-zero (fresh ones are 0,
    which leaves A without gradient), the same on every process."""
    model = add_adapters(model, LoraAdapterConfig(rank=rank), seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def one_update(model_dir: str, data: dict, strategy: str, loss: str = "gspo",
               loss_agg: str = "seq-mean-token-mean", lora_rank: int = 0) -> tuple[float, dict]:
    """One optimizer step (one mini-batch, SGD lr 1) on this rank's contiguous share of the batch;
    with `lora_rank` > 0, of LoRA adapters on the model (`with_adapters`).

    Returns the metrics reduced over ranks (the loss among them) and the full (unsharded)
    parameters after the step.
    """
    env = init_distributed("cpu")
    torch.manual_seed(0)
    model = load_model(model_dir)
    model = wrap_model(with_adapters(model, lora_rank) if lora_rank else model, strategy, env)
    cfg = TrainConfig()
    cfg.trainer.num_minibatches = 1
    cfg.algo.loss, cfg.algo.loss_agg = loss, loss_agg
    per_rank = len(data["rewards"]) // env.world_size
    batch = batch_rows(data, slice(env.rank * per_rank, (env.rank + 1) * per_rank))
    ctx = StepContext(cfg, task=None, tokenizer=None, env=env, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    metrics = reduce_over_ranks(update_policy(model, optimizer, scheduler, batch, ctx), env)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    params = {k: v.detach().clone() for k, v in params.items()}
    return metrics, params, env


def update_worker(rank: int, world: int, port: int, model_dir: str, batch_file: str, strategy: str,
                  out_file: str, loss: str = "gspo", loss_agg: str = "seq-mean-token-mean", lora_rank: int = 0) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    metrics, params, env = one_update(model_dir, torch.load(batch_file), strategy, loss, loss_agg, lora_rank)
    if rank == 0:
        torch.save({"metrics": metrics, "params": params}, out_file)
    shutdown(env)


def sharded_save_worker(rank: int, world: int, port: int, model_dir: str, run_dir: str, lora_rank: int = 0) -> None:
    """Shard the model (under adapters with `lora_rank` > 0) with FSDP2 on `world` ranks, perturb
    what trains, save a DCP checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gspo_cli.models.loading import load_tokenizer
    from gspo_cli.train.checkpoint import save_sharded_checkpoint

    env = init_distributed("cpu")
    model = load_model(model_dir)
    model = wrap_model(with_adapters(model, lora_rank) if lora_rank else model, "fsdp", env)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.01)  # so the saved weights differ from the ones on disk
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    save_sharded_checkpoint(Path(run_dir), 1, model, optimizer, load_tokenizer(model_dir), {"stream": {}},
                            keep_last=1, is_main=env.is_main)
    shutdown(env)


def generation_gathers_worker(rank: int, world: int, port: int, model_dir: str, out_file: str) -> None:
    """FSDP2-shard the model, then count the parameter all-gathers of rollouts of 2 and 8 new
    tokens, with and without `gathered_for_generation`; rank 0 saves the counts and the
    responses (which must not depend on how the parameters were gathered)."""
    from gspo_cli.models.loading import load_tokenizer
    from gspo_cli.rollout.generate import generate_rollout
    from gspo_cli.train.distributed import gathered_for_generation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    model, tokenizer = wrap_model(load_model(model_dir), "fsdp", env), load_tokenizer(model_dir)
    calls = [0]
    all_gather = torch.distributed.all_gather_single

    def counted(*args, **kwargs):
        calls[0] += 1
        return all_gather(*args, **kwargs)

    torch.distributed.all_gather_single = counted  # FSDP2 looks it up at every call
    results = {}
    for gathered in (False, True):
        for new_tokens in (2, 8):
            for module in model.modules():  # every measurement starts from sharded parameters
                if hasattr(module, "reshard"):
                    module.reshard()
            calls[0] = 0
            with torch.no_grad(), gathered_for_generation(model, enabled=gathered):
                rollout = generate_rollout(model, tokenizer, ["1+2=", "3+4="], new_tokens, 1.0,
                                           torch.Generator().manual_seed(0))
            results[gathered, new_tokens] = calls[0], rollout.input_ids
    # After the block the layers are sharded again: a training forward gathers them anew.
    calls[0] = 0
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    results["train_forward_backward"] = calls[0]
    torch.distributed.all_gather_single = all_gather
    if rank == 0:
        torch.save(results, out_file)
    shutdown(env)


def reductions_worker(rank: int, world: int, port: int, out_file: str) -> None:
    """Each rank holds its half of a batch of rewards; rank 0 saves what the ranks agree on."""
    from gspo_cli.algo.advantages import compute_advantages
    from gspo_cli.train.distributed import all_gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    env = init_distributed("cpu")
    rewards = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0]][rank])  # one group of 4 per rank
    everyone = all_gather_rows(rewards, env)
    metrics = reduce_over_ranks({"x_max": float(rank), "x_min": float(rank), "x": float(rank),
                                 "reward/std": everyone.std().item()}, env)
    advantages = compute_advantages(everyone, 4, "group-mean", "batch-std")[rank * 4:(rank + 1) * 4]
    gathered_advantages = all_gather_rows(advantages, env)
    if rank == 0:
        torch.save({"everyone": everyone, "metrics": metrics, "advantages": gathered_advantages}, out_file)
    shutdown(env)


def evaluation_context(model_dir: str, env) -> tuple:
    """A model (the Qwen3-like test checkpoint, which answers and ends its turn) and the context
    `steps.evaluate` needs: 9 held-out sums (not a multiple of 2 ranks) decoded in batches of 4,
    so the ranks (5 problems each) decode 2 batches each."""
    from gspo_cli.config import TaskConfig
    from gspo_cli.data.tasks import build_task
    from gspo_cli.models.loading import load_tokenizer

    cfg = TrainConfig(task=TaskConfig(max_operand=9, num_eval=9, chat_template=True))
    cfg.trainer.max_new_tokens, cfg.trainer.eval_batch_size = 12, 4
    tokenizer = load_tokenizer(model_dir)
    ctx = StepContext(cfg, task=build_task(cfg.task).for_tokenizer(tokenizer), tokenizer=tokenizer, env=env,
                      generator=torch.Generator().manual_seed(0))
    return load_model(model_dir), ctx


def evaluation_worker(rank: int, world: int, port: int, model_dir: str, out_file: str) -> None:
    """FSDP2-sharded greedy evaluation, the held-out problems shared across the ranks."""
    from gspo_cli.train.distributed import gathered_for_generation
    from gspo_cli.train.steps import evaluate, gather_correct

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    model, ctx = evaluation_context(model_dir, env)
    model = wrap_model(model, "fsdp", env)
    with gathered_for_generation(model):
        metrics, samples = evaluate(model, ctx)
    correct = gather_correct(samples, ctx)  # every rank's share, in the problems' order
    if rank == 0:
        torch.save({"metrics": metrics, "samples": samples, "correct": correct}, out_file)
    shutdown(env)


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: peak resident of this
    process image). Not `ru_maxrss`: across fork + exec it keeps the parent's peak, here pytest's."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def rank0_loading_worker(rank: int, world: int, port: int, model_dir: str, mode: str, out_file: str) -> None:
    """Load `model_dir` FSDP2-sharded, read by rank 0 alone (`mode="rank0"`) or by every rank
    (`"every-rank"`); save this rank's resident memory just before loading and its peak
    after, and (rank 0) the gathered weights, buffers and log-probabilities of a fixed batch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gspo_cli.models.loading import build_empty_model
    from gspo_cli.rollout.scoring import response_logprobs
    from gspo_cli.train.sharded_loading import load_sharded_from_rank0

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    resident_before = proc_status_bytes("VmRSS")
    if mode == "rank0":
        model = load_sharded_from_rank0(lambda: load_model(model_dir), lambda: build_empty_model(model_dir), env)
    else:
        model = wrap_model(load_model(model_dir), "fsdp", env)
    peak_after = proc_status_bytes("VmHWM")
    input_ids = torch.arange(2 * 6).reshape(2, 6) % 11 + 3
    with torch.no_grad():
        logp = response_logprobs(model, input_ids, torch.ones_like(input_ids), 3)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.save({"resident_before": resident_before, "peak_after": peak_after, "logp": logp, "weights": weights,
                "buffers": buffers}, f"{out_file}.{rank}")
    shutdown(env)


def dynamic_sampling_worker(rank: int, world: int, port: int, model_dir: str, out_file: str) -> None:
    """DAPO's dynamic sampling on FSDP2 ranks whose needs differ: on rank 0 every group is
    informative at once, on rank 1 none before its third draw. Saves how often each rank drew."""
    from gspo_cli.data.tasks import PromptStream
    from gspo_cli.train.steps import collect_rollout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    model, ctx = evaluation_context(model_dir, env)
    algo, tc = ctx.cfg.algo, ctx.cfg.trainer
    algo.dynamic_sampling, algo.max_refill_rounds = True, 3
    tc.prompts_per_step, tc.group_size, tc.max_new_tokens, tc.num_minibatches = 4, 2, 4, 1
    draws = []

    def score(completions, answers, num_tokens=None, max_tokens=None):
        draws.append(len(completions))
        informative = rank == 0 or len(draws) >= 3
        return [float(informative and i % 2) for i in range(len(completions))], {}

    ctx.task.score = score
    model = wrap_model(model, "fsdp", env)
    batch, timings = collect_rollout(model, ctx, PromptStream(ctx.task.train, 0))
    torch.save({"draws": len(draws), "refills": timings["sampling/refills"], "rewards": batch.rewards.tolist()},
               f"{out_file}.{rank}")
    shutdown(env)


def held_gradient_elements(model) -> int:
    """Gradient elements this rank holds now: FSDP2's sharded gradients, and the unsharded ones
    it keeps while gradient sync is off (`unsharded_accumulated_grad`, or the unsharded
    parameter's own `.grad`); a plain module's `.grad` tensors."""
    from torch.distributed.fsdp import FSDPModule

    held = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for param in (group.fsdp_params if group else []):
            if param.unsharded_accumulated_grad is not None:
                held += param.unsharded_accumulated_grad.numel()
            if hasattr(param, "_unsharded_param") and param._unsharded_param.grad is not None:
                held += param._unsharded_param.grad.numel()
            if param.sharded_param.grad is not None:
                held += param.sharded_param.grad.to_local().numel()
    return held


SCALE_PATH = dict(num_minibatches=2, micro_batch_size=3, micro_batch_tokens=0, old_logp="recompute",
                  gradient_checkpointing=True, routing_replay=True, fsdp_unsharded_accumulation=False)
"""What a long-response MoE run uses together: several mini-batches, micro-batches, π_old
recomputed, gradient checkpointing, Routing Replay (R2: π_old's experts forced)."""


def scale_path_order(num_rows: int, world: int, num_minibatches: int) -> torch.Tensor:
    """The one-process mini-batch order whose k-th mini-batch is the union of every rank's k-th
    (each rank holds a contiguous share and splits it in order)."""
    per_rank = num_rows // world
    chunks = [torch.arange(r * per_rank, (r + 1) * per_rank).chunk(num_minibatches) for r in range(world)]
    return torch.cat([chunks[r][k] for k in range(num_minibatches) for r in range(world)])


def scale_path_update(model_dir: str, data: dict, strategy: str, options: dict) -> tuple[dict, dict, dict]:
    """One RL step's update (SGD lr 1) with `SCALE_PATH`-like options on this rank's share:
    π_old of the later mini-batches recomputed as `collect_rollout` does, the first mini-batch's
    from its own passes. Returns the metrics reduced over ranks, the full parameters after the
    update, what the passes held (per micro-batch the gradient elements this rank held after its
    backward, and its shard's size; DDP's all-reduce calls, and the buckets of one backward), and
    the process group."""
    import gspo_cli.train.update as update
    from gspo_cli.models.routing import MoERouting
    from gspo_cli.train.steps import old_logprobs

    env = init_distributed("cpu")
    torch.manual_seed(0)
    model = wrap_model(load_model(model_dir, gradient_checkpointing=options["gradient_checkpointing"]), strategy, env)
    cfg = TrainConfig()
    tc, algo = cfg.trainer, cfg.algo
    tc.num_minibatches, tc.micro_batch_size = options["num_minibatches"], options["micro_batch_size"]
    tc.micro_batch_tokens, tc.max_grad_norm = options["micro_batch_tokens"], 1e9
    algo.loss, algo.clip_low, algo.clip_high = "grpo", 0.2, 0.28
    algo.old_logp, algo.routing_replay, algo.routing_volatility = options["old_logp"], options["routing_replay"], False
    cfg.hardware.fsdp_unsharded_accumulation = options["fsdp_unsharded_accumulation"]
    per_rank = len(data["rewards"]) // env.world_size
    batch = batch_rows(data, slice(env.rank * per_rank, (env.rank + 1) * per_rank))
    order = torch.arange(per_rank) if env.distributed else scale_path_order(per_rank, 2, tc.num_minibatches)
    # Before any forward pass: after a no-grad one FSDP2's root stays unsharded, and `parameters()`
    # would hand the optimizer those temporary tensors instead of the sharded ones.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    inner = getattr(model, "module", model)
    ctx = StepContext(cfg, task=None, tokenizer=None, env=env, generator=torch.Generator().manual_seed(0),
                      routing=MoERouting(inner))
    if algo.old_logp == "recompute":  # else the batch's π_old stands for the sampler's
        batch = batch._replace(old=old_logprobs(inner, batch.rollout, ctx, order.chunk(tc.num_minibatches)[1:]))
    batch = batch._replace(order=order)

    buckets, held, shard_size, calls = 0, [], sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                      for p in model.parameters()), [0]
    if strategy == "ddp" and env.distributed:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(torch.distributed.group.WORLD, counting)
        model(input_ids=batch.rollout.input_ids[:2]).logits.sum().backward()  # one synced backward: the buckets
        buckets, calls[0] = calls[0], 0
    original_sync = update.micro_batch_sync

    @contextlib.contextmanager
    def watched_sync(*args, **kwargs):
        with original_sync(*args, **kwargs):
            yield
        held.append(held_gradient_elements(model))

    update.micro_batch_sync = watched_sync
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    metrics = reduce_over_ranks(update.update_policy(model, optimizer, scheduler, batch, ctx), env)
    update.micro_batch_sync = original_sync
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    params = {k: v.detach().clone() for k, v in params.items()}
    grads_after = [p.grad for p in model.parameters() if p.grad is not None]
    return metrics, params, dict(held=held, shard_size=shard_size, allreduce_calls=calls[0], buckets=buckets,
                                 grads_left=len(grads_after)), env


def scale_path_worker(rank: int, world: int, port: int, model_dir: str, batch_file: str, strategy: str,
                      options: dict, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    metrics, params, seen, env = scale_path_update(model_dir, torch.load(batch_file), strategy, options)
    torch.save({"metrics": metrics, "params": params, "seen": seen}, f"{out_file}.{rank}")
def rng_round_trip_worker(rank: int, world: int, port: int, out_file: str) -> None:
    """Seed as the trainer does (`seed + rank`), draw, save every rank's random states the way a
    checkpoint does (gathered to rank 0, one weights-only file), draw on; then restore this rank's
    states from the file into fresh generators and draw again. Saves both draws of this rank."""
    import random

    import numpy as np

    from gspo_cli.train.checkpoint import gather_rng_states, own_rng_state, rng_state, set_rng_state
    from gspo_cli.train.loop import seed_everything

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    env = init_distributed("cpu")
    generator = seed_everything(7 + rank)
    torch.rand(3, generator=generator), torch.rand(3), random.random(), np.random.rand()

    def draw(g):
        return torch.rand(4, generator=g).tolist(), torch.rand(2).tolist(), random.random(), float(np.random.rand())

    states = gather_rng_states(rng_state(generator), env)
    if env.is_main:
        torch.save({"rng": states}, f"{out_file}.state")
    expected = draw(generator)
    torch.distributed.barrier()
    fresh = seed_everything(1000)
    set_rng_state(own_rng_state(torch.load(f"{out_file}.state", weights_only=True), env), fresh)
    torch.save({"expected": expected, "restored": draw(fresh), "saved_ranks": len(states)}, f"{out_file}.{rank}")
    shutdown(env)
