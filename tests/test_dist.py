"""Data parallelism on two gloo processes equals one process (DDP and FSDP2; per-sequence and
per-token normalisation over shards of unequal token counts; the logged metrics; the sharded
evaluation), DCP checkpoints reshard, and FSDP2 rollouts gather the parameters once."""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from dist_workers import (
    SCALE_PATH,
    dynamic_sampling_worker,
    evaluation_context,
    evaluation_worker,
    generation_gathers_worker,
    one_update,
    reductions_worker,
    scale_path_update,
    scale_path_worker,
    sharded_save_worker,
    update_worker,
)

from gspo_cli.algo.advantages import compute_advantages
from gspo_cli.models.loading import load_model
from gspo_cli.rollout.generate import generate_rollout
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.checkpoint import is_sharded, latest_checkpoint, load_sharded_model
from gspo_cli.train.distributed import DistEnv
from gspo_cli.train.steps import evaluate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def global_batch(tmp_path_factory, tiny_model_dir):
    """8 prompts × 4 responses from the tiny MoE, rewards drawn at random, π_old slightly off-policy."""
    from gspo_cli.models.loading import load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = [f"{a}+{a + 1}=" for a in range(8) for _ in range(4)]
    rollout = generate_rollout(model, tokenizer, prompts, 4, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1])
    rewards = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1)).float()
    noise = 1e-3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    # Responses of 1 to 4 tokens in the first half (rank 0's shard), 4 in the second: the two
    # shards hold (at most) 40 and 64 tokens, so a per-token normalisation needs the global count.
    T = rollout.response_mask.shape[1]
    lengths = torch.tensor([1, 2, 3, 4] * 4 + [T] * 16)
    response_mask = (torch.arange(T)[None] < lengths[:, None]).float() * rollout.response_mask
    assert response_mask[:16].sum() < response_mask[16:].sum()
    attention_mask = rollout.attention_mask.clone()
    attention_mask[:, -T:] = response_mask.long()
    data = dict(input_ids=rollout.input_ids, attention_mask=attention_mask,
                response_mask=response_mask, old_logp=logp + noise, entropy=rollout.entropy, rewards=rewards,
                advantages=compute_advantages(rewards, 4))
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(data, path)
    return path


def two_processes(tmp_path, tiny_model_dir, global_batch, strategy, loss, loss_agg):
    out = tmp_path / f"{strategy}.pt"
    mp.spawn(update_worker, args=(2, free_port(), str(tiny_model_dir), str(global_batch), strategy, str(out), loss,
                                  loss_agg), nprocs=2, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tiny_model_dir, global_batch):
    """The one-process update of the whole batch, per (loss, aggregation)."""
    results = {}

    def update(loss, loss_agg):
        if (loss, loss_agg) not in results:
            metrics, params, _ = one_update(str(tiny_model_dir), torch.load(global_batch), "ddp", loss, loss_agg)
            results[loss, loss_agg] = metrics, params
        return results[loss, loss_agg]

    return update


@pytest.mark.parametrize("strategy, loss, loss_agg", [
    # DDP's plain update is also the scale-path test's DDP case (with micro-batches): slow here, 15 s
    pytest.param("ddp", "gspo", "seq-mean-token-mean", marks=pytest.mark.slow),
    ("fsdp", "gspo", "seq-mean-token-mean"),
    ("ddp", "grpo", "token-mean"),  # DAPO's and CISPO's normalisation: by the tokens of both ranks
])
def test_two_processes_give_the_single_process_update(strategy, loss, loss_agg, tmp_path, tiny_model_dir,
                                                      global_batch, single):
    metrics, params = single(loss, loss_agg)
    result = two_processes(tmp_path, tiny_model_dir, global_batch, strategy, loss, loss_agg)
    # The loss sums terms of size |A| · ratio ≈ 1 that nearly cancel (advantages sum to 0 within
    # groups; a GSPO loss here is ~1e-5 to 1e-4), so its rounding is relative to those terms, not
    # to their sum: ~1e-8 seen, 1e-6 allowed.
    assert result["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=0, abs=1e-6)
    # The logged figures are the whole batch's: token-weighted fractions over both ranks' tokens
    # (the ranks' responses differ in length), maxima the maximum of both.
    for name in ("clip/fraction", "clip/high_fraction", "mismatch/seq_ratio_max", "mismatch/logp_abs_diff_max"):
        if name in metrics:
            assert result["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
    assert metrics["clip/fraction"] > 0
    before = load_model(tiny_model_dir).state_dict()
    for name, value in params.items():
        step, two_step = value - before[name], result["params"][name] - before[name]
        assert step.abs().max() > 0, name  # every tensor moved (the routers and norms too) ...
        # ... and by the same step on two processes, to float rounding (~1e-6 of the step)
        assert (two_step - step).norm() <= 1e-4 * step.norm(), name


@pytest.fixture(scope="module")
def single_scale_path(tiny_model_dir, global_batch):
    """The one-process update of the whole batch per set of options (see `scale_path_update`)."""
    results = {}

    def update(**options):
        key = tuple(sorted(options.items()))
        if key not in results:
            metrics, params, seen, _ = scale_path_update(str(tiny_model_dir), torch.load(global_batch), "ddp",
                                                         {**SCALE_PATH, **options})
            results[key] = metrics, params, seen
        return results[key]

    return update


def two_scale_path_processes(tmp_path, tiny_model_dir, global_batch, strategy, **options):
    out = tmp_path / f"{strategy}-scale"
    context = mp.spawn(scale_path_worker, args=(2, free_port(), str(tiny_model_dir), str(global_batch), strategy,
                                                {**SCALE_PATH, **options}, str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # ranks out of step in their passes would wait here forever
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish: their passes are out of step")
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


@pytest.mark.parametrize("strategy, options", [
    ("ddp", {}),
    ("fsdp", {}),
    # Token budget: rank 0's responses are 1-4 tokens, rank 1's all 4, so with 12 tokens a pass the
    # ranks pack a mini-batch's 8 rows into 6 and 8 passes, and must agree on 8.
    ("fsdp", {"micro_batch_size": 0, "micro_batch_tokens": 12}),
])
def test_the_scale_path_on_two_processes_gives_the_single_process_update(strategy, options, tmp_path,
                                                                           tiny_model_dir, global_batch,
                                                                           single_scale_path):
    """Micro-batches × 2 mini-batches × π_old recomputed (the first mini-batch's from its own
    passes) × gradient checkpointing × Routing Replay, on DDP and FSDP2: the metrics and the
    parameters after the update are those of one process; FSDP2 holds a shard's gradient at
    every micro-batch; DDP all-reduces once per mini-batch; no gradient outlives the update."""
    metrics, params, seen = single_scale_path(**options)
    ranks = two_scale_path_processes(tmp_path, tiny_model_dir, global_batch, strategy, **options)
    result = ranks[0]
    assert result["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=0, abs=1e-6)  # see the test above
    for name in ("clip/fraction", "routing/changed_fraction"):  # token-weighted over both ranks
        assert result["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
    assert metrics["routing/changed_fraction"] > 0  # the routes drifted: replay forced other experts
    before = load_model(tiny_model_dir).state_dict()
    for name, value in params.items():
        step, two_step = value - before[name], result["params"][name] - before[name]
        assert step.abs().max() > 0, name
        assert (two_step - step).norm() <= 1e-4 * step.norm(), name
    passes = len(ranks[0]["seen"]["held"])
    assert passes == len(ranks[1]["seen"]["held"]) >= 4  # the same number of passes on each rank
    for rank in ranks:
        assert rank["seen"]["grads_left"] == 0  # freed before the next rollout
        if strategy == "fsdp":  # a shard's gradient after every micro-batch, never the whole model's
            assert max(rank["seen"]["held"]) <= rank["seen"]["shard_size"] < sum(v.numel() for v in before.values())
        else:  # one all-reduce per bucket per mini-batch, whatever the number of micro-batches
            assert rank["seen"]["allreduce_calls"] == 2 * rank["seen"]["buckets"], rank["seen"]


def test_sharded_checkpoint_from_two_processes_loads_in_one(tmp_path, tiny_model_dir):
    mp.spawn(sharded_save_worker, args=(2, free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and is_sharded(checkpoint)
    model = load_model(tiny_model_dir)
    load_sharded_model(model, checkpoint)
    expected = {k: v + 0.01 for k, v in load_model(tiny_model_dir).state_dict().items()}
    for name, value in model.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def test_fsdp_generation_gathers_the_parameters_once_not_per_token(tmp_path, tiny_model_dir):
    """hardware.gather_for_rollout: under FSDP2 a rollout all-gathers each layer once,
    whatever the number of decoded tokens; without it, every token gathers every layer."""
    out = tmp_path / "gathers.pt"
    mp.spawn(generation_gathers_worker, args=(2, free_port(), str(tiny_model_dir), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    per_token = results[False, 2][0], results[False, 8][0]
    once = results[True, 2][0], results[True, 8][0]
    assert per_token[1] > per_token[0]  # the problem: gathers grow with the decoded tokens
    assert once[0] == once[1] <= per_token[0], (once, per_token)
    # Exact: the same kernels on the same gathered weights, whenever they were gathered.
    assert torch.equal(results[True, 8][1], results[False, 8][1])  # the same responses
    assert results["train_forward_backward"] > 0  # resharded afterwards: training gathers again


def test_statistics_over_ranks_are_the_whole_batchs(tmp_path):
    """Maxima stay maxima, minima minima, and a batch-wide std (`reward/std`,
    `algo.adv_scale=batch-std`) is that of all ranks' rewards, as in one process."""
    from gspo_cli.algo.advantages import compute_advantages

    out = tmp_path / "reductions.pt"
    mp.spawn(reductions_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    whole = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 5.0])
    assert torch.equal(result["everyone"], whole)
    assert (result["metrics"]["x_max"], result["metrics"]["x_min"], result["metrics"]["x"]) == (1.0, 0.0, 0.5)
    assert result["metrics"]["reward/std"] == pytest.approx(whole.std().item())
    torch.testing.assert_close(result["advantages"], compute_advantages(whole, 4, "group-mean", "batch-std"))


def test_sharded_evaluation_gives_the_one_process_figures(tmp_path, real_checkpoint_dir):
    """Two FSDP2 ranks share 9 held-out problems (5 and 4, the second padded to 5 so both
    decode in lockstep): the logged figures are those of one process evaluating all 9."""
    out = tmp_path / "eval.pt"
    mp.spawn(evaluation_worker, args=(2, free_port(), str(real_checkpoint_dir), str(out)), nprocs=2, join=True)
    result = torch.load(out)
    model, ctx = evaluation_context(str(real_checkpoint_dir), DistEnv())
    metrics, samples = evaluate(model, ctx)
    assert len(samples) == 9 and len(result["samples"]) == 5  # rank 0 keeps its own share's samples
    assert result["samples"] == samples[:5]
    # Counts (greedy tokens, rewards) over the 9 problems, not sums of floats: equal but for the division.
    assert result["metrics"] == pytest.approx(metrics, rel=1e-12)
    assert 0 < metrics["eval/accuracy"] < 1 and metrics["eval/response_length"] < 12  # answers, and stops
    # which problems were answered right, gathered from both ranks without rank 1's padding repeat
    assert result["correct"] == [int(s["reward"] >= 1.0) for s in samples]


def test_dynamic_sampling_keeps_fsdp_ranks_in_lockstep(tmp_path, real_checkpoint_dir):
    """Rank 0 has its groups after one draw, rank 1 after three: both draw three times (FSDP2's
    collective forward passes and the prompt stream stay aligned) and each keeps a full share."""
    out = tmp_path / "draws"
    context = mp.spawn(dynamic_sampling_worker, args=(2, free_port(), str(real_checkpoint_dir), str(out)),
                       nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # a rank left waiting in a collective would hang here
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish: their draws are out of step")
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert [r["draws"] for r in ranks] == [3, 3] and [r["refills"] for r in ranks] == [2.0, 2.0]
    assert all(r["rewards"] == [0.0, 1.0] * 2 for r in ranks)  # 2 informative groups of 2 on each rank
