"""The supervised warm start: landing near its target, small data files, responses too short."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TEST_SPEC, compose_train
from test_train import small_overrides

from gspo_cli.config import TaskConfig, WarmStartConfig
from gspo_cli.data.tasks import build_task
from gspo_cli.models.storage import config_hash
from gspo_cli.rollout.evaluation import greedy_eval
from gspo_cli.rollout.scoring import positions_from_mask
from gspo_cli.train.loop import resolve_model_path
from gspo_cli.train import warmstart
from gspo_cli.train.warmstart import PROBE_SIZE, probe_and_pool, warm_start


@pytest.mark.slow  # about 100 supervised steps: ~40 s on a quiet 2-core machine, minutes on a busy one
def test_warm_start_lands_within_a_few_points_of_its_target(tiny_model):
    model, tokenizer = tiny_model
    task = build_task(TaskConfig(max_operand=9, num_eval=20))  # 80 one-digit sums to train on
    # Checked every 30 steps at a high learning rate, the probe jumps between checks (on this
    # machine 0.33 at step 60, 0.89 at step 90); the landing replays steps 61-90 one at a time
    # and stops next to the first that reaches the target (0.49 at step 73, 0.54 at step 74).
    cfg = WarmStartConfig(enabled=True, target_accuracy=0.5, lr=1e-2, check_every=30, batch_size=64)
    lines = []
    summary = warm_start(model, tokenizer, task, cfg, max_new_tokens=4, log=lines.append)
    assert abs(summary["probe_accuracy"] - 0.5) <= 0.06, lines
    # The model left behind is the one that was measured (the landing restored it if it went back a step).
    probe = task.train[:PROBE_SIZE]
    assert greedy_eval(model, tokenizer, task, probe, 4)[0]["eval/accuracy"] == summary["probe_accuracy"]
    assert greedy_eval(model, tokenizer, task, task.eval, 4)[0]["eval/accuracy"] == summary["heldout_accuracy"]
    assert "held-out (base) accuracy" in lines[-1]


def test_warm_start_on_a_file_smaller_than_a_batch(tmp_path, cache_dir):
    # 40 rows, 8 held out: 32 training rows against a warm-start batch of 64 ("Sample larger than population").
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n"
                            for a in range(1, 5) for b in range(10)))
    cfg = compose_train(small_overrides(cache_dir) + [
        "task=gsm8k", f"task.path={data}", "task.num_eval=8",
        "model.warm_start.max_steps=4", "model.warm_start.check_every=2", "model.warm_start.target_accuracy=0.99"])
    lines = []
    path = resolve_model_path(cfg, build_task(cfg.task), log=lines.append)
    assert (Path(path) / "config.json").exists()
    assert any("held-out (base) accuracy" in line for line in lines), lines


def test_responses_too_short_for_the_reference_fail_with_the_setting_to_change(tiny_model):
    model, tokenizer = tiny_model
    task = build_task(TaskConfig(name="arithmetic-chain", reward="final_answer_match", chain_length=3,
                                 max_operand=9, operators="+-", num_problems=200, num_eval=20))
    with pytest.raises(ValueError, match=r"trainer.max_new_tokens=8 .*trainer.max_new_tokens>=3\d"):
        warm_start(model, tokenizer, task, WarmStartConfig(enabled=True, max_steps=2, check_every=1),
                   max_new_tokens=8, log=print)


def test_the_probe_is_left_out_of_training_when_the_split_is_large_enough():
    problems = build_task(TaskConfig(num_problems=3000, num_eval=256)).train
    probe, pool = probe_and_pool(problems)
    assert len(probe) == PROBE_SIZE and len(probe) + len(pool) == len(problems)
    assert not {p.prompt for p in probe} & {p.prompt for p in pool}
    small = problems[:4 * PROBE_SIZE - 1]  # a small file trains on all of its problems
    assert probe_and_pool(small)[1] == small


def test_a_check_within_the_tolerance_ends_the_warm_start_there(tiny_model, monkeypatch):
    # Scripted probe accuracies, checked every step: 0.10, then 0.44 (0.01 under the target). The
    # warm start ends at step 2; without the tolerance it would train on until the probe passes 0.45.
    model, tokenizer = tiny_model
    accuracies = iter([0.10, 0.44, 0.30, 0.60, 0.60, 0.60])
    monkeypatch.setattr(warmstart, "greedy_eval",
                        lambda *args, **kwargs: ({"eval/accuracy": next(accuracies)}, []))
    task = build_task(TaskConfig(max_operand=9, num_eval=20))
    cfg = WarmStartConfig(enabled=True, target_accuracy=0.45, tolerance=0.02, check_every=1, max_steps=10)
    summary = warm_start(model, tokenizer, task, cfg, max_new_tokens=4, log=print)
    assert (summary["steps"], summary["probe_accuracy"]) == (2, 0.44)


def test_begin_from_trains_the_easier_warm_start_first_and_continues_from_its_weights(tmp_path, monkeypatch):
    """`model.warm_start.begin_from` (a curriculum): the named warm start is trained (or reused),
    and the longer one begins from its saved weights, not from the freshly built model."""
    from gspo_cli.models.loading import load_model

    def checksum(model) -> float:
        return sum(float(p.double().sum()) for p in model.state_dict().values())

    stages = []  # (chain_length, checksum of the weights the stage began from)

    def fake_warm_start(model, tokenizer, task, cfg, max_new_tokens, log):
        stages.append((len(task.train[0].answer.split("\n")) - 1, max_new_tokens, checksum(model)))
        with torch.no_grad():  # a stand-in for training: every stage moves the weights
            next(model.parameters()).add_(1.0)
        return {"steps": 1}

    monkeypatch.setattr(warmstart, "warm_start", fake_warm_start)
    common = ["experiment=paper", f"cache_dir={tmp_path}", "task.num_problems=300", "task.num_eval=20"]
    # The shipped curriculum: length=long begins from length=medium's warm start, which begins from length=short's.
    short, medium, long = (compose_train(common + [f"length={name}"]) for name in ("short", "medium", "long"))
    built = load_model(warmstart.built_model_dir(long.model, tmp_path))

    long_dir = warmstart.warm_started_dir(long.model, long.task, tmp_path, 512, build_task(long.task), log=print)
    assert [(length, tokens) for length, tokens, _ in stages] == [(2, 40), (10, 136), (39, 512)]
    found = {}
    for name, cfg in (("short", short), ("medium", medium)):  # each stage is that length's own warm start
        lines = []
        found[name] = warmstart.warm_started_dir(cfg.model, cfg.task, tmp_path, cfg.trainer.max_new_tokens,
                                                 build_task(cfg.task), log=lines.append)
        assert "reusing" in lines[0], (name, lines)
    assert len(stages) == 3
    assert stages[0][2] == checksum(built)  # the first stage began from the built model
    assert stages[1][2] == checksum(load_model(found["short"])) != checksum(built)  # the next from its result
    assert stages[2][2] == checksum(load_model(found["medium"])) != stages[1][2]
    assert checksum(load_model(long_dir)) != checksum(load_model(found["medium"]))
    long.model.warm_start.begin_from = {"chain_lenght": 10}
    long.model.warm_start.seed = 1  # another cache key, so the stage is not reused
    with pytest.raises(ValueError, match="chain_lenght"):
        warmstart.warm_started_dir(long.model, long.task, tmp_path, 512, build_task(long.task), log=print)


def hand_balancing_loss(router_logits: tuple, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss as Qwen3-MoE computes it, by hand: over every
    layer's non-padding tokens, f_e = (top-k choices of expert e) / tokens, P_e = mean router
    probability of e, loss = E · Σ_e f_e P_e. Balanced (f_e = k/E, P_e = 1/E) it is k."""
    keep = mask.reshape(-1).bool()
    E = router_logits[0].shape[-1]
    choices, probs, tokens = torch.zeros(E), torch.zeros(E), 0
    for logits in router_logits:
        p = torch.softmax(logits[keep].float(), -1)  # [tokens, E]
        choices += torch.nn.functional.one_hot(p.topk(k, -1).indices, E).float().sum((0, 1))
        probs += p.sum(0)
        tokens += int(keep.sum())
    return E * ((choices / tokens) * (probs / tokens)).sum()


def test_the_balancing_coefficient_adds_coef_times_the_load_balancing_loss(tiny_model):
    model, tokenizer = tiny_model
    task = build_task(TaskConfig(max_operand=99, num_eval=20))
    ids, mask, labels = warmstart.supervised_batch(tokenizer, task.train[:8])
    assert (mask == 0).any()  # prompts of different lengths: padding the balancing loss must leave out
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    before = model(**inputs, labels=labels).loss  # the warm start's loss before the option existed
    assert torch.equal(warmstart.supervised_loss(model, ids, mask, labels, 0.0), before)  # coef 0: bit for bit
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    aux = hand_balancing_loss(out.router_logits, mask, TEST_SPEC.num_experts_per_tok)
    assert 2.0 <= aux.item() < 4.0  # k = 2 when balanced, E = 4 when every token picks the same k
    for coef in (0.1, 0.001):
        loss = warmstart.supervised_loss(model, ids, mask, labels, coef)
        assert loss.item() == pytest.approx(before.item() + coef * aux.item(), rel=1e-6)
    loss = warmstart.supervised_loss(model, ids, mask, labels, 0.1)
    loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_the_per_layer_scope_adds_the_mean_of_each_layer_s_balancing_loss(tiny_model):
    model, tokenizer = tiny_model
    task = build_task(TaskConfig(max_operand=99, num_eval=20))
    ids, mask, labels = warmstart.supervised_batch(tokenizer, task.train[:8])
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    cross_entropy = model(**inputs, labels=labels).loss
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    k = TEST_SPEC.num_experts_per_tok
    per_layer = torch.stack([hand_balancing_loss((logits,), mask, k) for logits in out.router_logits]).mean()
    pooled = hand_balancing_loss(out.router_logits, mask, k)
    assert per_layer.item() > pooled.item() + 1e-3  # layers favouring different experts: the two differ
    loss = warmstart.supervised_loss(model, ids, mask, labels, 0.1, "layer")
    assert loss.item() == pytest.approx(cross_entropy.item() + 0.1 * per_layer.item(), rel=1e-6)
    # The model's own coefficient is back to pooled use afterwards: pooled still adds the pooled loss.
    loss = warmstart.supervised_loss(model, ids, mask, labels, 0.1, "pooled")
    assert loss.item() == pytest.approx(cross_entropy.item() + 0.1 * pooled.item(), rel=1e-6)
    with pytest.raises(ValueError, match="balance_scope"):
        warmstart.supervised_loss(model, ids, mask, labels, 0.1, "layers")


def test_an_unknown_balancing_scope_fails_before_the_warm_start_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(warmstart, "warm_start", lambda *args, **kwargs: pytest.fail("trained"))
    cfg = compose_train(["model=tiny-qwen3-moe", f"cache_dir={tmp_path}", "model.warm_start.balance_scope=layers"])
    with pytest.raises(ValueError, match="balance_scope='layers'"):
        warmstart.warm_started_dir(cfg.model, cfg.task, tmp_path, 8, build_task(cfg.task), log=print)


def test_the_top_k_margin_is_the_gap_between_the_k_th_and_the_next_router_logit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0],   # top 2: 3, 2; next 1 -> 1
                           [0.5, 0.4, 0.1, 0.45]])  # top 2: 0.5, 0.45; next 0.4 -> 0.05
    assert torch.allclose(warmstart.topk_margin(logits, 2), torch.tensor([1.0, 0.05]))
    assert torch.allclose(warmstart.topk_margin(logits, 1), torch.tensor([1.0, 0.05]))
    # Sorted 0.001, 0.005, 0.02, 0.5, 1.0: median 0.02; 10th percentile at position 0.4: 0.001 + 0.4 · 0.004;
    # 2 of 5 below 0.01.
    stats = warmstart.margin_metrics(torch.tensor([[0.5, 0.005, 1.0, 0.02, 0.001]]))
    assert stats == pytest.approx({"routing/topk_margin_median": 0.02, "routing/topk_margin_p10": 0.0026,
                                   "routing/near_tie_share": 0.4})


def test_the_warm_start_reports_the_expert_load_and_stores_it_with_the_weights(tmp_path, monkeypatch):
    # Scripted probe accuracies: the target is met at the first check, so the run is 1 step.
    monkeypatch.setattr(warmstart, "greedy_eval", lambda *args, **kwargs: ({"eval/accuracy": 0.45}, []))
    cfg = compose_train(["model=tiny-qwen3-moe", f"cache_dir={tmp_path}", "task.num_eval=20",
                         "model.warm_start.check_every=1", "model.warm_start.balance_coef=0.01"])
    lines = []
    path = warmstart.warm_started_dir(cfg.model, cfg.task, tmp_path, 8, build_task(cfg.task), log=lines.append)
    stored = json.loads((path / warmstart.METADATA).read_text())
    assert stored["steps"] == 1 and stored["warm_start"]["balance_coef"] == 0.01
    assert 0.0 < stored["routing/load_entropy"] <= 1.0
    assert 1 / 8 <= stored["routing/max_load_share"] <= 1 / 2  # tiny-qwen3-moe: 8 experts, top-2
    assert 0.0 < stored["routing/topk_margin_p10"] < stored["routing/topk_margin_median"]
    # a tenth of the margins below 0.01 exactly when the 10th percentile is below it
    assert 0.0 < stored["routing/near_tie_share"] < 1.0
    assert (stored["routing/near_tie_share"] > 0.1) == (stored["routing/topk_margin_p10"] < 0.01)
    # The mean of the layers' loads is at least as even as the layers on average (entropy is concave).
    assert stored["routing/load_entropy_pooled"] >= stored["routing/load_entropy"] - 1e-6
    assert any("expert load" in line and "balance_coef 0.01" in line for line in lines), lines


def test_the_cache_key_changes_with_the_balancing_coefficient():
    cfg = compose_train(["experiment=paper"])
    key = lambda coef: warmstart.warm_start_key(  # noqa: E731
        "base", dataclasses.replace(cfg.model.warm_start, balance_coef=coef), cfg.task, 48)
    assert len({key(0.0), key(0.001), key(0.01), key(0.1)}) == 4
    # At 0 the key is the one of before the option, so warm starts cached then are reused.
    before = {k: v for k, v in dataclasses.asdict(cfg.model.warm_start).items()
              if k not in ("balance_coef", "balance_scope")}
    assert key(0.0) == config_hash("base", before, cfg.task, 48, warmstart.WARM_START_VERSION)
    # The scope likewise: left out at `pooled` (keys of before it stay valid) and wherever the coefficient is 0.
    scoped = lambda coef, scope: warmstart.warm_start_key(  # noqa: E731
        "base", dataclasses.replace(cfg.model.warm_start, balance_coef=coef, balance_scope=scope), cfg.task, 48)
    pooled = {k: v for k, v in dataclasses.asdict(cfg.model.warm_start).items() if k != "balance_scope"}
    pooled["balance_coef"] = 0.1
    assert scoped(0.1, "pooled") == config_hash("base", pooled, cfg.task, 48, warmstart.WARM_START_VERSION)
    assert scoped(0.1, "layer") != scoped(0.1, "pooled")
    assert scoped(0.0, "layer") == key(0.0)


def test_the_paper_s_model_is_warm_started_with_the_balancing_loss_and_the_default_model_without():
    assert compose_train(["experiment=paper"]).model.warm_start.balance_coef > 0
    assert compose_train([]).model.warm_start.balance_coef == 0  # tiny-qwen3-moe: its cached warm start stays valid
