"""The throughput benchmark (bench/): FLOP counts, the bookkeeping, and a tiny run end to end."""

import datetime
import json
import math
from types import SimpleNamespace

import pytest
import torch

from bench.flops import active_params, matmul_shapes, step_flops
from bench.project import summarize_metrics
from bench.run import main, pair_ratios
from gspo_cli.config import ModelConfig, TinyModelSpec
from gspo_cli.models.build import build_char_tokenizer, built_model_dir

# A one-layer, 32-wide MoE keeps each run to a second or two; the 1,024-token vocabulary of
# bench-qwen3-moe stays, so that random responses run to full length as in the real workload.
TINY = ["--prompts", "4", "--group-size", "2", "--max-new-tokens", "4", "--minibatches", "2",
        "--matmul-seconds", "0.02", "--model-override", "model.name=bench-test"] + [
    arg for override in ("hidden_size=32", "num_hidden_layers=1", "num_attention_heads=2", "num_key_value_heads=1",
                         "head_dim=16", "num_experts=4", "moe_intermediate_size=16")
    for arg in ("--model-override", f"model.build.{override}")]
RUN_FIELDS = ["framework", "version", "source_digest", "timed_s", "phases", "response_tokens", "prompt_tokens", "completions",
              "tokens_per_s", "completions_per_s", "flops", "utilisation", "peak_rss_mib"]
PHASES = ["generate_s", "old_logp_s", "update_s", "reward_s"]


def moe_config(**changes):
    values = dict(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=2, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=3, intermediate_size=5, num_hidden_layers=2,
                  vocab_size=10)
    return SimpleNamespace(**{**values, **changes})


def test_active_params_count_attention_router_topk_experts_and_head():
    # attention: q and o 4·(2·2) each = 32, k and v 4·(1·2) each = 16 -> 48 per layer
    # MoE: router 4·4 = 16, two experts of 3 matrices 4×3 -> 2·3·12 = 72 -> 88 per layer
    # 2 layers · (48 + 88) = 272, plus the LM head 4·10 = 40 -> 312
    assert active_params(moe_config()) == 312
    # dense: gate, up and down 4×5 -> 60 per layer; 2 · (48 + 60) + 40 = 256
    assert active_params(moe_config(num_experts=0)) == 256


def test_step_flops_follow_2_2_6_per_parameter_and_token():
    # 10 active parameters, 3 tokens: a forward pass is 2·10·3 = 60 FLOPs
    assert step_flops(10, 3) == {"generate": 60.0, "old_logp": 60.0, "update": 180.0, "step": 300.0}


def test_matmul_shapes_use_minibatch_tokens_and_tokens_per_expert():
    # 8 sequences in 2 mini-batches of 4, 5 tokens each: 20 rows; top-2 of 4 experts: 10 rows per expert
    assert matmul_shapes(8, 5, moe_config(), 2) == [(20, 4, 4), (20, 4, 10), (10, 4, 3)]


def test_summarize_metrics_adds_the_timed_steps_only():
    lines = [
        {"step": 0, "time/step_s": 2.0, "time/generate_s": 1.0, "time/reward_s": 0.1, "time/old_logp_s": 0.3,
         "time/update_s": 0.6, "throughput/tokens_per_s": 50.0, "eval/accuracy": 0.0},
        {"step": 1, "time/step_s": 4.0, "time/generate_s": 2.0, "time/reward_s": 0.2, "time/old_logp_s": 0.6,
         "time/update_s": 1.2, "throughput/tokens_per_s": 25.0},
        {"step": 2, "eval/accuracy": 0.5},  # the final evaluation: not a timed step
    ]
    summary = summarize_metrics(lines, rollout_size=16)
    # 2 s · 50 tokens/s + 4 s · 25 tokens/s = 200 tokens; 2 steps of 16 completions
    assert summary["response_tokens"] == 200 and summary["completions"] == 32 and summary["steps"] == 2
    assert summary["timed_s"] == pytest.approx(6.0)
    assert summary["phases"] == pytest.approx({"generate_s": 3.0, "reward_s": 0.3, "old_logp_s": 0.9, "update_s": 1.8})
    # a warm-up step apart from the timed one
    warmup, timed = summarize_metrics(lines, 16, count=1), summarize_metrics(lines, 16, first=1)
    assert (warmup["steps"], warmup["timed_s"], warmup["response_tokens"]) == (1, 2.0, 100)
    assert (timed["steps"], timed["timed_s"], timed["response_tokens"]) == (1, 4.0, 100)


def test_pair_ratios_divide_tokens_per_second_within_each_pair():
    runs = [{"pair": 0, "framework": "gspo", "tokens_per_s": 300.0}, {"pair": 0, "framework": "trl", "tokens_per_s": 100.0},
            {"pair": 1, "framework": "trl", "tokens_per_s": 120.0}, {"pair": 1, "framework": "gspo", "tokens_per_s": 240.0},
            {"pair": 2, "framework": "gspo", "tokens_per_s": 999.0}]  # no trl run: no ratio
    assert [(r["pair"], r["ratio"]) for r in pair_ratios(runs)] == [(0, 3.0), (1, 2.0)]
    runs[0]["warmup"], runs[1]["warmup"] = {"tokens_per_s": 150.0}, {"tokens_per_s": 100.0}
    assert pair_ratios(runs[:2])[0]["warmup_ratio"] == 1.5


def test_padded_tokenizer_encodes_text_as_before_and_keeps_cache_keys(tmp_path):
    plain, padded = build_char_tokenizer(), build_char_tokenizer(1024)
    assert len(plain) == 99 and len(padded) == 1024  # 3 specials + 96 characters, then reserved tokens
    assert padded("12+34=")["input_ids"] == plain("12+34=")["input_ids"]
    # The default spec hashes as it did before `vocab_size` existed (the hash of its ten older
    # fields, seed 0, tokenizer version 1), so warm starts cached by earlier versions stay valid.
    assert built_model_dir(ModelConfig(name="probe", build=TinyModelSpec()), tmp_path).name == "probe-88f03c322d2c"


def check_result(result: dict, frameworks: list[str]) -> None:
    for key in ["date", "command", "machine", "versions", "workload", "model", "flops_formula", "matmul", "runs",
                "pairs", "median_ratio"]:
        assert key in result, key
    assert [run["framework"] for run in result["runs"]] == frameworks
    assert result["matmul"]["best_flops_per_s"] > 0
    assert result["source_changed_during_run"] is False and len(result["versions"]["gspo_source_digests"]) == 1
    for run in result["runs"]:
        for key in RUN_FIELDS:
            assert key in run, (run["framework"], key)
        assert set(PHASES) <= set(run["phases"])
        # 4 prompts × 2 responses of at most 4 tokens; the 1,024-token vocabulary rarely ends one early
        for steps in (run, run["warmup"]):  # the timed step, and the warm-up step before it
            assert steps["steps"] == 1 and steps["completions"] == 8 and 8 <= steps["response_tokens"] <= 32
            assert 0 < sum(steps["phases"].values()) <= steps["timed_s"] * 1.001
            assert math.isclose(steps["tokens_per_s"], steps["response_tokens"] / steps["timed_s"])
        assert 0 < run["prompt_tokens"] < 4 * 2 * 20  # the timed step's 8 prompts of at most ~11 characters
        assert 0 < run["utilisation"]["update"] and run["peak_rss_mib"] > 0


def test_a_second_invocation_on_one_day_does_not_overwrite_the_first(tmp_path):
    from bench.run import default_results_path

    day = datetime.date(2026, 11, 30)
    assert default_results_path(tmp_path, day) == tmp_path / "2026-11-30.json"
    (tmp_path / "2026-11-30.json").write_text("{}")
    assert default_results_path(tmp_path, day) == tmp_path / "2026-11-30-2.json"
    (tmp_path / "2026-11-30-2.json").write_text("{}")
    assert default_results_path(tmp_path, day) == tmp_path / "2026-11-30-3.json"


def test_project_only_run_writes_the_result_json(tmp_path, monkeypatch):
    monkeypatch.setenv("GSPO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "result.json"
    main(TINY + ["--pairs", "1", "--skip-trl", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    result = json.loads(out.read_text())
    check_result(result, ["gspo"])
    assert result["pairs"] == [] and result["median_ratio"] is None
    assert result["model"]["active_params"] < result["model"]["total_params"]  # top-2 of 4 experts


def test_a_pair_with_trl_reports_its_ratio_and_both_versions(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "result.json"
    main(TINY + ["--pairs", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    result = json.loads(out.read_text())
    check_result(result, ["gspo", "trl"])
    (pair,) = result["pairs"]
    assert pair["ratio"] == pytest.approx(pair["gspo_tokens_per_s"] / pair["trl_tokens_per_s"])
    assert result["median_ratio"] == pair["ratio"]
    assert result["median_warmup_ratio"] == pair["warmup_ratio"] > 0
    gspo, trl = result["runs"]
    assert gspo["prompt_tokens"] == trl["prompt_tokens"]  # the same timed prompts, counted apart
    assert result["versions"]["trl"] and result["versions"]["gspo-cli"]


def test_a_gpu_workload_runs_this_project_on_hardware_gpu_with_the_chosen_precision(tmp_path):
    from bench.workload import Workload, compose_train_config, project_overrides

    cfg = compose_train_config(project_overrides(Workload(device="cuda", precision="bf16"), tmp_path))
    assert (cfg.hardware.device, cfg.hardware.precision) == ("cuda", "bf16")
    cfg = compose_train_config(project_overrides(Workload(device="cuda"), tmp_path))  # fp32 unless asked
    assert (cfg.hardware.device, cfg.hardware.precision) == ("cuda", "fp32")
    cfg = compose_train_config(project_overrides(Workload(), tmp_path))
    assert (cfg.hardware.device, cfg.hardware.precision) == ("cpu", "fp32")


def test_trl_runs_where_and_how_precisely_the_workload_says(tmp_path):
    pytest.importorskip("trl")
    from bench.trl_grpo import grpo_config
    from bench.workload import Workload

    args = grpo_config(Workload(), tmp_path)
    assert args.use_cpu and not args.bf16 and args.importance_sampling_level == "sequence"


def test_matmul_reference_in_bf16():
    from bench.flops import matmul_throughput

    ref = matmul_throughput([(64, 32, 16)], seconds=0.01, dtype=torch.bfloat16)
    assert ref["best_flops_per_s"] > 0 and ref["dtype"] == "bfloat16" and ref["device"] == "cpu"


def test_the_real_size_gpu_entry_has_qwen3_30b_a3b_layers(tmp_path):
    """`--model bench-qwen3-moe-gpu` composes into the shape its config file states (built on
    the meta device: no memory, no time)."""
    from bench.workload import Workload, compose_train_config, project_overrides
    from gspo_cli.models.build import build_char_tokenizer, build_tiny_model

    cfg = compose_train_config(project_overrides(Workload(model="bench-qwen3-moe-gpu", device="cuda"), tmp_path))
    assert cfg.hardware.device == "cuda" and not cfg.model.warm_start.enabled
    tokenizer = build_char_tokenizer(cfg.model.build.vocab_size)
    with torch.device("meta"):
        model = build_tiny_model(cfg.model.build, tokenizer, seed=0)
    assert len(tokenizer) == 151_936
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 2.80
    assert round(active_params(model.config) / 1e9, 2) == 0.54


def test_the_decode_limit_moves_the_weights_once_and_every_row_s_cache_per_step():
    from types import SimpleNamespace

    from bench.decode import decode_limit, kv_bytes_per_token

    qwen3_0_6b = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=8, head_dim=128, hidden_size=1024,
                                 num_attention_heads=16)
    assert kv_bytes_per_token(qwen3_0_6b, 2) == 2 * 28 * 8 * 128 * 2  # keys and values, bf16: 114,688 bytes
    # 1.2 GB of weights and 64 rows of 518 tokens (6 + 1024 / 2) at 4 TB/s: 64 × 4e12 / (1.2e9 + 64 × 518 × 114688)
    assert decode_limit(1.2e9, 114688, 64, 518, 4e12) == pytest.approx(64 * 4e12 / (1.2e9 + 64 * 518 * 114688))
    assert decode_limit(1.2e9, 114688, 64, 518, 4e12) == pytest.approx(51_178, rel=1e-4)  # 1.25 ms a step


def test_the_engine_comparison_times_each_engine_on_the_same_rows(tiny_model):
    from bench.decode import compare_engines

    model, tokenizer = tiny_model
    result = compare_engines(model, tokenizer, ["1+2=", "3+4="] * 2, 4, "cpu")
    assert set(result["engines"]) == {"builtin", "continuous", "generate"}
    for name, engine in result["engines"].items():
        assert 0 < engine["generated_tokens"] <= 4 * 4, name
        assert engine["fraction_of_decode_limit"] == pytest.approx(
            engine["tokens_per_s"] / result["decode_limit_tokens_per_s"]), name
