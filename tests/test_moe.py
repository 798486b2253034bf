"""Routing capture, replay and the changed-fraction metric on the tiny Qwen3-MoE."""

import math

import pytest
import torch
from conftest import TEST_SPEC

from gspo_cli.models.build import build_char_tokenizer, build_tiny_model
from gspo_cli.models.routing import (
    MoERouting,
    RoutingReplayUnsupported,
    changed_fraction,
    find_routers,
    route_rows,
    routes_by_sequence,
    routing_metrics,
    volatility_metrics,
)
from gspo_cli.rollout.generate import encode_prompts, generate_rollout
from gspo_cli.rollout.scoring import positions_from_mask, response_logprobs


def test_changed_fraction_compares_sets_per_token():
    # Token 0: old {1, 2}, current {2, 1} -> same set, 0 changed.
    # Token 1: old {1, 2}, current {1, 3} -> one of two slots changed, 0.5.
    # Token 2: masked out (would be fully changed).
    old = torch.tensor([[[1, 2], [1, 2], [0, 1]]])
    cur = torch.tensor([[[2, 1], [1, 3], [5, 6]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert changed_fraction(cur, old, mask).item() == pytest.approx(0.25)  # (0 + 0.5) / 2


def test_routing_metrics_per_layer_and_mean():
    old = [torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]])]
    cur = [torch.tensor([[[0, 1]]]), torch.tensor([[[2, 3]]])]
    m = routing_metrics(cur, old, torch.ones(1, 1))
    assert m == {"routing/changed_fraction/layer_0": 0.0, "routing/changed_fraction/layer_1": 1.0,
                 "routing/changed_fraction": 0.5}


def forward_routes(model, routing, ids, mask):
    """Per layer [N, L, k] experts chosen in one forward pass over the batch."""
    with torch.no_grad(), routing.capture() as routes:
        model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    return routes_by_sequence(list(routes), ids.shape[0])


@pytest.fixture
def moe_and_batch(tiny_model):
    model, tokenizer = tiny_model
    ids, mask = encode_prompts(tokenizer, ["1+2=3", "40+59=99", "7+7=14"], "cpu")
    return model, ids, mask


def test_capture_records_every_layer(moe_and_batch):
    model, ids, mask = moe_and_batch
    routing = MoERouting(model)
    assert routing.num_layers == TEST_SPEC.num_hidden_layers
    by_seq = forward_routes(model, routing, ids, mask)
    assert [tuple(r.shape) for r in by_seq] == [(3, ids.shape[1], TEST_SPEC.num_experts_per_tok)] * routing.num_layers


def test_replay_of_own_routes_is_exact_and_forces_other_routes(moe_and_batch):
    model, ids, mask = moe_and_batch
    routing = MoERouting(model)
    T = 3
    with routing.capture() as routes:
        base = response_logprobs(model, ids, mask, T)
    routes = list(routes)
    # Replaying the model's own choices changes nothing.
    with routing.replay(routes):
        replayed = response_logprobs(model, ids, mask, T)
    assert torch.allclose(base, replayed, atol=1e-6)
    # Forcing other experts changes the output and the forced experts are the ones used.
    other = [(r + 1) % TEST_SPEC.num_experts for r in routes]
    with routing.capture() as natural, routing.replay(other):
        forced = response_logprobs(model, ids, mask, T)
    assert not torch.allclose(base, forced, atol=1e-4)
    assert all(torch.equal(n, r) for n, r in zip(natural, routes))  # capture sees the router's own choice


def test_replay_lets_gradients_reach_the_router(moe_and_batch):
    model, ids, mask = moe_and_batch
    routing = MoERouting(model)
    with routing.capture() as routes:
        model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    routes = list(routes)
    with routing.replay(routes):
        logp = response_logprobs(model, ids, mask, 3)
    logp.sum().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routing.routers)


def test_route_rows_matches_a_forward_on_those_rows(moe_and_batch):
    model, ids, mask = moe_and_batch
    routing = MoERouting(model)
    by_seq = forward_routes(model, routing, ids, mask)
    rows = torch.tensor([2, 0])
    with routing.capture() as sub:
        model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=positions_from_mask(mask[rows]))
    assert all(torch.equal(a, b) for a, b in zip(route_rows(by_seq, rows), sub))


def test_dense_model_has_no_routers():
    spec = type(TEST_SPEC)(**{**vars(TEST_SPEC), "num_experts": 0})
    dense = build_tiny_model(spec, build_char_tokenizer(), seed=0)
    assert find_routers(dense) == []
    assert MoERouting(dense).num_layers == 0


def test_unsupported_moe_is_a_clear_error():
    class FakeMoE(torch.nn.Module):
        config = type("C", (), {"num_experts": 4})()

    with pytest.raises(RoutingReplayUnsupported, match="no top-k router"):
        find_routers(FakeMoE())


def run_small(tmp_path, cache_dir, *extra):
    import json

    from conftest import compose_train
    from test_train import small_overrides

    from gspo_cli.train.loop import train

    cfg = compose_train(small_overrides(cache_dir, "grpo", steps=2) + ["logger=none", "trainer.save_final=false", *extra])
    train(cfg, tmp_path)
    return [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("old_logp", ["auto", "recompute"])  # auto: π_old's routes are the sampler's
def test_training_logs_routing_drift_per_layer(tmp_path, cache_dir, old_logp):
    records = run_small(tmp_path, cache_dir, f"algo.old_logp={old_logp}")
    for r in records[:2]:
        assert 0.0 <= r["routing/changed_fraction"] <= 1.0
        layers = [r[f"routing/changed_fraction/layer_{i}"] for i in range(TEST_SPEC.num_hidden_layers)]
        assert r["routing/changed_fraction"] == pytest.approx(sum(layers) / len(layers))
        assert r["routing/replay_cache_mb"] > 0
    # lr 1e-2 moves the routers: after the first mini-batch some choices change.
    assert max(r["routing/changed_fraction"] for r in records[:2]) > 0


def test_sampler_routes_and_recomputed_routes_measure_the_same_drift(tmp_path, cache_dir):
    """In float32 the routes recorded while sampling are the π_old pass's routes, so both
    sources of π_old report the same drift (counting a token the sampler never fed back, whose
    route is only a copy, made the sampler's figure about three times larger)."""
    drift = lambda records: [r for r in records if "routing/changed_fraction" in r]  # noqa: E731
    auto = drift(run_small(tmp_path / "auto", cache_dir, "algo.old_logp=auto"))
    recompute = drift(run_small(tmp_path / "recompute", cache_dir, "algo.old_logp=recompute"))
    assert len(auto) == len(recompute) == 2
    for a, r in zip(auto, recompute):
        assert a["routing/changed_fraction"] == pytest.approx(r["routing/changed_fraction"], abs=2e-3)
    assert max(r["routing/changed_fraction"] for r in recompute) > 0


def test_routing_replay_changes_the_update_when_routes_drift(tmp_path, cache_dir):
    base = run_small(tmp_path / "base", cache_dir)
    replayed = run_small(tmp_path / "replay", cache_dir, "algo.routing_replay=true")
    # Mini-batch 0 is on-policy (same routes, same update in both runs); from mini-batch 1 on,
    # tokens whose experts changed are computed with π_old's experts under replay.
    assert base[0]["routing/changed_fraction"] > 0
    assert replayed[0]["loss"] != pytest.approx(base[0]["loss"], rel=1e-6)
    assert replayed[0]["reward/mean"] == base[0]["reward/mean"]  # same rollout: sampling is unaffected


def test_dense_model_reports_no_routing_and_refuses_replay(tmp_path, cache_dir):
    dense = ["model.name=test-dense", "model.build.num_experts=0"]
    records = run_small(tmp_path, cache_dir, *dense)
    assert not any(k.startswith("routing/") for k in records[0])
    with pytest.raises(ValueError, match="dense"):
        run_small(tmp_path / "again", cache_dir, *dense, "algo.routing_replay=true")


def test_unchanged_parameters_change_no_route_and_replay_gives_ratio_one(moe_and_batch):
    model, ids, mask = moe_and_batch
    routing = MoERouting(model)
    with routing.capture() as first:
        old_logp = response_logprobs(model, ids, mask, 3)
    first = routes_by_sequence(list(first), ids.shape[0])
    with routing.capture() as second, routing.replay(route_rows(first, torch.arange(ids.shape[0]))):
        logp = response_logprobs(model, ids, mask, 3)
    second = routes_by_sequence(list(second), ids.shape[0])
    assert routing_metrics(second, first, mask.float())["routing/changed_fraction"] == 0.0
    # Ratio 1 to float rounding: under replay the expert weights come from the hook's softmax and
    # gather, not the router's own top-k, the same numbers by a different path.
    torch.testing.assert_close(torch.exp(logp - old_logp), torch.ones_like(logp), rtol=0, atol=1e-6)


def test_after_a_large_update_routes_change(moe_and_batch):
    model, ids, mask = moe_and_batch
    routing = MoERouting(model)
    before = forward_routes(model, routing, ids, mask)
    with torch.no_grad():
        for router in routing.routers:
            router.weight.add_(torch.randn_like(router.weight))
    after = forward_routes(model, routing, ids, mask)
    assert routing_metrics(after, before, mask.float())["routing/changed_fraction"] > 0.1


def test_sampler_routes_are_those_of_a_full_forward_pass(tiny_model):
    """The experts recorded while sampling (one token at a time, KV cache) are the experts a
    forward pass over the finished sequences chooses, on every real token but the last."""
    model, tokenizer = tiny_model
    routing = MoERouting(model)
    prompts = [f"{a}+{b}=" for a in (1, 23, 456) for b in (7, 89)]
    rollout = generate_rollout(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0), routing=routing)
    N, L = rollout.input_ids.shape
    assert [tuple(r.shape) for r in rollout.routes] == [(N, L, TEST_SPEC.num_experts_per_tok)] * routing.num_layers
    full = forward_routes(model, routing, rollout.input_ids, rollout.attention_mask)
    real = rollout.attention_mask.bool().clone()
    real[:, -1] = False  # the last token is never fed back while sampling
    assert real.sum() > N * 4
    # Expert ids, compared exactly: router logits a rounding apart (KV cache against one pass) choose
    # another expert only at a near-tie, as the sampler's tokens in test_perf.py.
    for sampled, forward in zip(rollout.routes, full):
        assert torch.equal(sampled[real].sort(-1).values, forward[real].sort(-1).values)
        assert torch.equal(sampled[:, -1], sampled[:, -2])  # the unseen last column repeats the one before


def test_volatility_of_hand_made_routes():
    # One layer, two tokens, top-2. Mini-batch 0: token 0's experts only swap slots (unchanged),
    # token 1 keeps expert 2 and trades 3 for 4 (half changed): (0 + 0.5) / 2 = 0.25.
    before = [torch.tensor([[[0, 1], [2, 3]]])]
    after = [torch.tensor([[[1, 0], [2, 4]]])]
    first = routing_metrics(after, before, torch.ones(1, 2))["routing/changed_fraction"]
    assert first == pytest.approx(0.25)
    # Mini-batch 1: both experts of both tokens change: 1.0. The mean over mini-batches is 0.625.
    second = routing_metrics([torch.tensor([[[5, 6], [7, 0]]])], before, torch.ones(1, 2))["routing/changed_fraction"]
    assert volatility_metrics([first, second]) == {"routing/volatility/minibatch_0": 0.25,
                                                   "routing/volatility/minibatch_1": 1.0,
                                                   "routing/volatility": 0.625}
    assert volatility_metrics([]) == {}


def update_with(tmp_path, cache_dir, lr, *extra):
    """One RL step's update of the test MoE (4 mini-batches of 8) with AdamW at `lr`; its metrics."""
    import dataclasses

    from conftest import compose_train
    from test_train import small_overrides

    import gspo_cli.train.steps as steps
    from gspo_cli.train.distributed import DistEnv
    from gspo_cli.train.loop import make_context, setup
    from gspo_cli.train.update import update_policy

    cfg = compose_train(small_overrides(cache_dir) + ["algo=grpo", *extra])
    policy, tokenizer, task, state = setup(cfg, tmp_path, DistEnv(), print)
    ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
    batch, _ = steps.collect_rollout(policy, ctx, state.stream)
    adamw = torch.optim.AdamW(policy.parameters(), lr=lr)
    ctx = dataclasses.replace(ctx, cfg=cfg)
    return update_policy(policy, adamw, torch.optim.lr_scheduler.LambdaLR(adamw, lambda i: 1.0), batch, ctx)


@pytest.mark.parametrize("micro", [0, 3])  # the probe's routes gathered from one pass, or from three
def test_volatility_compares_the_policies_before_and_after_each_step(tmp_path, cache_dir, micro):
    # lr 0: the policy after each step is the one before it, so no expert changes; with micro-batches
    # of 3 rows the probe's 5 rows are gathered from two passes, in order.
    still = update_with(tmp_path / "still", cache_dir, 0.0, f"trainer.micro_batch_size={micro}",
                        "algo.routing_volatility_rows=5")
    assert [still[f"routing/volatility/minibatch_{i}"] for i in range(4)] == [0.0] * 4
    assert still["routing/volatility"] == 0.0
    # A large step moves the routers: each step changes some experts of the same tokens. The
    # first mini-batch counts too (its on-policy routing/changed_fraction is 0 by construction).
    moved = update_with(tmp_path / "moved", cache_dir, 0.1, f"trainer.micro_batch_size={micro}")
    assert all(0.0 < moved[f"routing/volatility/minibatch_{i}"] <= 1.0 for i in range(4)), moved
    assert moved["routing/volatility"] == pytest.approx(sum(moved[f"routing/volatility/minibatch_{i}"]
                                                            for i in range(4)) / 4)


def test_volatility_is_switchable_and_logged_in_a_run(tmp_path, cache_dir):
    off = update_with(tmp_path / "off", cache_dir, 0.1, "algo.routing_volatility=false")
    assert not any(k.startswith("routing/volatility") for k in off)
    records = run_small(tmp_path / "run", cache_dir)  # on by default for an MoE model
    for r in records[:2]:
        assert 0.0 <= r["routing/volatility"] <= 1.0
        assert {f"routing/volatility/minibatch_{i}" for i in range(4)} <= set(r)


def test_small_qwen3_moe_has_the_scaled_down_qwen3_30b_a3b_shape():
    from conftest import compose_train

    cfg = compose_train(["model=small-qwen3-moe"])
    model = build_tiny_model(cfg.model.build, build_char_tokenizer(), seed=0)
    c = model.config
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == (8, 32, 4, True)
    assert c.num_attention_heads // c.num_key_value_heads == 32 // 4
    assert MoERouting(model).num_layers == 8  # every layer is MoE, as in Qwen3-30B-A3B
    assert cfg.model.warm_start.enabled
    # A 600-token sequence (the prompt and worked solution of a 62-operation chain) runs.
    ids = torch.randint(3, len(build_char_tokenizer()), (1, 600))
    assert model(input_ids=ids).logits.shape == (1, 600, len(build_char_tokenizer()))


# ---------------------------------------------------------------------------- replay in the update


def random_routes(num_seqs: int, length: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per layer [N, L, 2] distinct expert pairs drawn at random: every row, token and layer its own."""
    routes = []
    for _ in range(TEST_SPEC.num_hidden_layers):
        first = torch.randint(0, TEST_SPEC.num_experts, (num_seqs, length, 1), generator=generator)
        shift = torch.randint(1, TEST_SPEC.num_experts, (num_seqs, length, 1), generator=generator)
        routes.append(torch.cat([first, (first + shift) % TEST_SPEC.num_experts], -1).to(torch.uint8))
    return routes


def replay_batch(model, tokenizer, cache_dir, *overrides):
    """12 responses of unequal lengths whose π_old experts are random (far from the model's own),
    and a context with Routing Replay on."""
    from conftest import compose_train
    from test_train import small_overrides

    import gspo_cli.train.steps as steps
    from gspo_cli.train.distributed import DistEnv

    prompts = [f"{a}+{7 * a}=" for a in range(1, 13)]
    rollout = generate_rollout(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0))
    N, L = rollout.input_ids.shape
    T = rollout.response_mask.shape[1]
    routes = random_routes(N, L, torch.Generator().manual_seed(1))
    routing = MoERouting(model)
    with torch.no_grad(), routing.replay([r.reshape(-1, 2) for r in routes]):
        old_logp = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T)
    advantages = torch.linspace(-1, 1, N)
    batch = steps.Batch(rollout._replace(logp=old_logp), advantages, advantages, rollout.entropy, torch.arange(N),
                        steps.OldPolicy(torch.arange(N), old_logp, routes))
    cfg = compose_train(small_overrides(cache_dir, "grpo") + ["algo.routing_replay=true", *overrides])
    ctx = steps.StepContext(cfg, None, tokenizer, DistEnv(), torch.Generator().manual_seed(0), routing)
    return batch, ctx


def test_routing_replay_forces_each_rows_own_pi_old_experts(tiny_model, cache_dir, monkeypatch):
    """Rows sorted by length into passes of at most 40 tokens, each cut to its columns: every
    row's log-probabilities in the update are those of that row alone under its own π_old
    experts (random ones, so a row given another row's experts, or shifted by a column, differs)."""
    import gspo_cli.train.update as update

    model, tokenizer = tiny_model
    model.train()
    batch, ctx = replay_batch(model, tokenizer, cache_dir, "trainer.micro_batch_tokens=40")
    rows = torch.arange(batch.rewards.numel())
    seen, original = [], update.minibatch_loss
    monkeypatch.setattr(update, "minibatch_loss", lambda logp, old_logp, b, idx, c, n: seen.append(
        (idx, logp.detach(), old_logp)) or original(logp, old_logp, b, idx, c, n))
    update.accumulate_gradients(model, batch, rows, ctx, batch.old, update.loss_counts(batch, rows, ctx))
    assert len(seen) > 2 and any(not torch.equal(idx, idx.sort().values) for idx, _, _ in seen)  # sorted passes
    mask, T = batch.rollout.response_mask, batch.rollout.response_mask.shape[1]
    for idx, logp, old_logp in seen:
        real = mask[idx].bool()
        # π_old was computed under the same routes: ratio 1 on every real token
        torch.testing.assert_close(logp[real], old_logp[real], rtol=0, atol=1e-5)
    own = response_logprobs(model, batch.rollout.input_ids, batch.rollout.attention_mask, T)
    # The forced experts do matter: without them the same rows are 100× the tolerance above away.
    assert (own - batch.old.logp)[mask.bool()].abs().max() > 1e-3


def test_routing_replay_with_gradient_checkpointing_gives_the_gradient_without_it(tiny_model_dir, cache_dir):
    """Gradient checkpointing re-runs each layer in the backward pass; Routing Replay must force
    π_old's experts there too (it used to end before the backward: CheckpointError, 61 vs 56
    tensors saved). Same gradient with and without checkpointing, micro-batches of 5 rows."""
    import gspo_cli.train.update as update
    from gspo_cli.models.loading import load_model, load_tokenizer

    grads = {}
    for checkpointing in (False, True):
        model = load_model(tiny_model_dir, gradient_checkpointing=checkpointing)
        model.train()
        batch, ctx = replay_batch(model, load_tokenizer(tiny_model_dir), cache_dir, "trainer.micro_batch_size=5")
        rows = torch.arange(batch.rewards.numel())
        update.accumulate_gradients(model, batch, rows, ctx, batch.old, update.loss_counts(batch, rows, ctx))
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model.model.gradient_checkpointing and grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 0 for name, g in grads[True].items() if "gate" in name)  # routers learn


def test_routes_are_kept_in_one_byte_and_only_when_something_reads_them(tmp_path, cache_dir):
    """Expert indices of 4 (up to 256) experts are stored as uint8; with routing metrics, Routing
    Replay and the volatility probe off, no route is captured at all."""
    from conftest import compose_train
    from test_train import small_overrides

    import gspo_cli.train.steps as steps
    from gspo_cli.models.routing import route_dtype
    from gspo_cli.train.distributed import DistEnv
    from gspo_cli.train.loop import make_context, setup

    assert (route_dtype(128), route_dtype(256), route_dtype(257), route_dtype(40_000)) == (
        torch.uint8, torch.uint8, torch.int16, torch.int32)
    for source in ("rollout", "recompute"):
        for kept in (True, False):
            cfg = compose_train(small_overrides(cache_dir) + [
                f"algo.old_logp={source}", f"algo.routing_metrics={kept}", f"algo.routing_volatility={kept}"])
            policy, tokenizer, task, state = setup(cfg, tmp_path / f"{source}-{kept}", DistEnv(), print)
            ctx = make_context(cfg, policy, tokenizer, task, DistEnv(), state)
            batch, timings = steps.collect_rollout(policy, ctx, state.stream)
            if kept:
                assert batch.old.routes[0].dtype == torch.uint8 and timings["routing/replay_cache_mb"] > 0
            else:
                assert batch.old.routes is None and batch.rollout.routes is None
                assert "routing/replay_cache_mb" not in timings


def test_the_volatility_probe_takes_a_share_of_its_rows_on_each_rank():
    from gspo_cli.config import TrainConfig
    from gspo_cli.train.distributed import DistEnv
    from gspo_cli.train.steps import StepContext
    from gspo_cli.train.update import probe_rows

    cfg = TrainConfig()
    rows = torch.arange(64)
    for world, expected in ((1, 16), (2, 8), (3, 6), (8, 2), (32, 1)):  # 16 rows across the ranks, rounded up
        ctx = StepContext(cfg, None, None, DistEnv(world_size=world), torch.Generator())
        assert torch.equal(probe_rows(rows, ctx), rows[:expected])
    cfg.algo.routing_volatility_rows = 0  # every row
    assert torch.equal(probe_rows(rows, StepContext(cfg, None, None, DistEnv(world_size=8), torch.Generator())), rows)


def test_load_balance_of_hand_made_routes():
    from gspo_cli.models.routing import expert_load, load_balance_metrics

    # 4 experts, top-2. Layer 0: tokens {0,1}, {2,3}, {0,1}, {2,3} -> every expert 2 of 8 choices:
    # load [1/4] * 4, entropy log 4 / log 4 = 1, largest share 1/4.
    balanced = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    # Layer 1: the same tokens on experts {0,1} only -> load [1/2, 1/2, 0, 0]: entropy log 2 / log 4 = 1/2.
    halved = torch.tensor([[[0, 1], [1, 0], [0, 1], [1, 0]]])
    mask = torch.ones(1, 4)
    assert expert_load([balanced, halved], mask, 4).tolist() == [[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]
    m = load_balance_metrics([balanced, halved], mask, 4)
    assert m["routing/load_entropy"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["routing/max_load_share"] == pytest.approx((0.25 + 0.5) / 2)
    # Top-1, every token on expert 3: it takes the whole load -> entropy 0, largest share 1.
    one = load_balance_metrics([torch.full((2, 3, 1), 3)], torch.ones(2, 3), 4)
    assert one == {"routing/load_entropy": 0.0, "routing/max_load_share": 1.0}
    # Masked tokens do not count: only token 0's {0, 1} -> load [1/2, 1/2, 0, 0].
    masked = load_balance_metrics([balanced], torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 4)
    assert masked == pytest.approx({"routing/load_entropy": 0.5, "routing/max_load_share": 0.5})


def test_pooled_load_balance_counts_every_layer_s_choices_together():
    from gspo_cli.models.routing import load_balance_metrics, pooled_load_balance_metrics

    # 4 experts, top-2, two layers each on two experts of their own: each layer's load is uneven
    # (entropy 1/2, largest share 1/2) while the pooled load is even (entropy 1, largest share 1/4).
    first, second = torch.tensor([[[0, 1], [1, 0], [0, 2]]]), torch.tensor([[[2, 3], [3, 2], [3, 2]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token does not count
    assert load_balance_metrics([first, second], mask, 4) == pytest.approx(
        {"routing/load_entropy": 0.5, "routing/max_load_share": 0.5})
    assert pooled_load_balance_metrics([first, second], mask, 4) == pytest.approx(
        {"routing/load_entropy_pooled": 1.0, "routing/max_load_share_pooled": 0.25})
    # Three layers, two on experts {0, 1}: load [1/3, 1/3, 1/6, 1/6].
    load = torch.tensor([1 / 3, 1 / 3, 1 / 6, 1 / 6])
    three = pooled_load_balance_metrics([first, first, second], mask, 4)
    assert three["routing/load_entropy_pooled"] == pytest.approx(float(-(load * load.log()).sum() / math.log(4)))
    assert three["routing/max_load_share_pooled"] == pytest.approx(1 / 3)


def test_training_logs_the_expert_load_of_pi_old_routes(tmp_path, cache_dir):
    records = run_small(tmp_path, cache_dir)
    for r in records[:2]:  # the test model: 4 experts, top-2; no expert ever takes more than 1/2
        assert 0.0 < r["routing/load_entropy"] <= 1.0
        assert 1 / TEST_SPEC.num_experts <= r["routing/max_load_share"] <= 1 / TEST_SPEC.num_experts_per_tok
