"""`make gpu-check`: one short real-shaped run on one GPU, measured.

Qwen3-0.6B's shape with random weights (`model=bench-qwen3-0.6b-gpu`), responses of 1,024
tokens, bf16 compute over float32 master weights (`hardware=gpu`: autocast, AdamW state in
float32, log-probabilities from float32 logits). Writes `bench/results/gpu-check-<date>.json` with:

- two training runs of `--steps` RL steps, padded (`trainer.micro_batch_tokens=0`) and packed
  (`--packed-tokens`): peak GPU memory, response tokens/s, the step's phase times and the
  update's model-FLOPs utilisation against the measured bf16 matmul rate, for each;
- the bf16 noise floor of the GSPO ratio at zero update (`mismatch/seq_ratio_max` − 1 of step
  0, before any optimizer step, against the 4e-4 clip);
- the rollout engines side by side (`bench/decode.py`): generated tokens/s of the built-in
  sampler, transformers' continuous batching and `model.generate()` on the same 64 rows, and
  the fraction of the decode step's memory-traffic limit each reaches.

    make gpu-check                     # or: python -m bench.gpu_check [--steps 2] [--length 1024]

Random weights never end a response early, so every row is `--length` long and the packed run
does the padded run's work (its gain shows on long-tailed lengths: bench/padding.py). Budget
about 8 minutes on one H100/H200 (the model is built and cached first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.flops import active_params, measure_matmul, step_flops
from bench.workload import compose_train_config

REPO_ROOT = Path(__file__).resolve().parent.parent
GSPO_CLIP_HIGH = 4e-4  # the paper's upper clip range (§5.1)


def overrides(length: int, steps: int, cache_dir: str, model: str = "bench-qwen3-0.6b-gpu",
              hardware: str = "gpu") -> list[str]:
    return [f"model={model}", f"hardware={hardware}", "logger=none", f"cache_dir={cache_dir}",
            f"trainer.max_new_tokens={length}", f"model.build.max_position_embeddings={length + 64}",
            "trainer.prompts_per_step=8", "trainer.group_size=8", "trainer.num_minibatches=4",
            "trainer.micro_batch_size=8", "trainer.rollout_batch_size=64", "trainer.logprob_chunk_tokens=4096",
            "trainer.eval_batch_size=8", "task.num_eval=8", f"trainer.max_steps={steps}",
            f"trainer.eval_every={steps}", "trainer.save_final=false", "algo=gspo", "trainer.lr=1e-6"]


def train_and_measure(chosen: list[str], bf16_rate: float, cache_dir: str) -> dict:
    """One training run of `chosen` overrides: its records and the update's MFU per step."""
    from transformers import AutoConfig

    from gspo_cli.models.build import built_model_dir
    from gspo_cli.train.loop import train

    cfg = compose_train_config(chosen)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, Path(run_dir))
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    wall = time.perf_counter() - start
    steps = [r for r in records if "time/step_s" in r]
    num_active = active_params(AutoConfig.from_pretrained(built_model_dir(cfg.model, Path(cache_dir))))
    num_seqs = cfg.trainer.prompts_per_step * cfg.trainer.group_size
    tokens = [num_seqs * (r["response_length/mean"] + r.get("prompt_length/mean", 6)) for r in steps]
    mfu = [step_flops(num_active, n)["update"] / r["time/update_s"] / bf16_rate for n, r in zip(tokens, steps)]
    return {
        "overrides": [o for o in chosen if not o.startswith("cache_dir=")], "wall_s": wall, "active_params": num_active,
        "peak_gpu_gib": max(r.get("memory/peak_gpu_gib", float("nan")) for r in steps),
        "peak_host_gib": max(r.get("memory/peak_rss_gib", float("nan")) for r in steps),
        "response_length_mean": statistics.mean(r["response_length/mean"] for r in steps),
        "response_tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in steps),
        "phases_s": {k: [r.get(f"time/{k}") for r in steps] for k in ("generate_s", "old_logp_s", "update_s", "step_s")},
        "update_mfu_vs_measured_bf16": mfu, "clip_fraction": [r.get("clip/fraction") for r in steps],
        "first_step": steps[0],
    }


def engine_comparison(cfg, cache_dir: str, length: int, on_gpu: bool) -> dict:
    """The rollout engines on 8 prompts × 8 rows of `length` tokens, on a copy of the model in
    the compute dtype (bf16 on a GPU)."""
    from bench.decode import compare_engines
    from gspo_cli.data.tasks import build_task
    from gspo_cli.models.build import built_model_dir
    from gspo_cli.models.loading import load_model, load_tokenizer

    model_dir = built_model_dir(cfg.model, Path(cache_dir))
    model = load_model(model_dir, "bfloat16" if on_gpu else "float32", cfg.hardware.device).eval()
    tokenizer = load_tokenizer(model_dir)
    prompts = [p.prompt for p in build_task(cfg.task).train[:8] for _ in range(8)]
    try:
        return compare_engines(model, tokenizer, prompts, length, cfg.hardware.device)
    finally:
        del model
        if on_gpu:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024, help="trainer.max_new_tokens")
    parser.add_argument("--engine", default="builtin", help="trainer.rollout_engine of the training runs")
    parser.add_argument("--packed-tokens", type=int, default=16384, help="trainer.micro_batch_tokens of the packed run")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-check-<date>.json)")
    parser.add_argument("--model", default="bench-qwen3-0.6b-gpu", help=argparse.SUPPRESS)  # CPU smoke runs
    parser.add_argument("--hardware", default="gpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = args.hardware != "cpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU")
    cache_dir = os.environ.get("GSPO_CACHE_DIR", str(Path("~/.cache/gspo").expanduser()))
    chosen = overrides(args.length, args.steps, cache_dir, args.model, args.hardware) + [
        f"trainer.rollout_engine={args.engine}"]
    cfg = compose_train_config(chosen)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    shape = (8192, 8192, 8192) if on_gpu else (512, 512, 512)
    bf16_rate = measure_matmul(shape, device=cfg.hardware.device, dtype=torch.bfloat16)
    start = time.perf_counter()
    padded = train_and_measure(chosen + ["trainer.micro_batch_tokens=0"], bf16_rate, cache_dir)
    packed = train_and_measure(chosen + [f"trainer.micro_batch_tokens={args.packed_tokens}"], bf16_rate, cache_dir)
    decode = engine_comparison(cfg, cache_dir, args.length, on_gpu)
    first = padded.pop("first_step")
    packed.pop("first_step")
    result = {
        "date": dt.date.today().isoformat(), "commit": os.environ.get("GSPO_COMMIT"), "gpu": name,
        "torch": torch.__version__, "bf16_matmul_tflops": bf16_rate / 1e12, "wall_s": time.perf_counter() - start,
        "padded": padded, "packed": packed, "decode": decode,
        "bf16_seq_ratio_noise_floor": first["mismatch/seq_ratio_max"] - 1.0,
        "bf16_logp_abs_diff": first["mismatch/logp_abs_diff"],
        "noise_floor_over_clip_high": (first["mismatch/seq_ratio_max"] - 1.0) / GSPO_CLIP_HIGH,
    }
    out = Path(args.out or REPO_ROOT / "bench" / "results" / f"gpu-check-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
