"""`make gpu-check`: one short real-shaped run on one GPU, measured.

Qwen3-0.6B's shape with random weights (`model=bench-qwen3-0.6b-gpu`), responses of 1,024
tokens, bf16 compute over float32 master weights (`hardware=gpu`: autocast, AdamW state in
float32, log-probabilities from float32 logits), 2 RL steps. Writes
`bench/results/gpu-check-<date>.json` with: peak GPU memory, response tokens/s, phase times,
model-FLOPs utilisation of the update (against the GPU's measured bf16 matmul rate and its
datasheet peak), and the bf16 noise floor of the GSPO ratio at zero update
(`mismatch/seq_ratio_max` − 1 of step 0, before any optimizer step, against the 4e-4 clip).

    make gpu-check                     # or: python -m bench.gpu_check [--steps 2] [--length 1024]

Takes 3–5 minutes on one H100/H200 (the model is built and cached first).
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024, help="trainer.max_new_tokens")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-check-<date>.json)")
    parser.add_argument("--model", default="bench-qwen3-0.6b-gpu", help=argparse.SUPPRESS)  # CPU smoke runs
    parser.add_argument("--hardware", default="gpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = args.hardware != "cpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU")
    from gspo_cli.train.loop import train  # after the check: importing builds nothing on the GPU

    cache_dir = os.environ.get("GSPO_CACHE_DIR", str(Path("~/.cache/gspo").expanduser()))
    chosen = overrides(args.length, args.steps, cache_dir, args.model, args.hardware)
    cfg = compose_train_config(chosen)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    shape = (8192, 8192, 8192) if on_gpu else (512, 512, 512)
    bf16_rate = measure_matmul(shape, device=cfg.hardware.device, dtype=torch.bfloat16)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, Path(run_dir))
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    wall = time.perf_counter() - start
    steps = [r for r in records if "time/step_s" in r]

    from transformers import AutoConfig

    from gspo_cli.models.build import built_model_dir

    model_config = AutoConfig.from_pretrained(built_model_dir(cfg.model, Path(cache_dir)))
    num_active = active_params(model_config)
    num_seqs = cfg.trainer.prompts_per_step * cfg.trainer.group_size
    tokens = [num_seqs * (r["response_length/mean"] + r.get("prompt_length/mean", 6)) for r in steps]
    update_flops = [step_flops(num_active, n)["update"] for n in tokens]
    mfu = [f / r["time/update_s"] / bf16_rate for f, r in zip(update_flops, steps)]
    first = steps[0]
    result = {
        "date": dt.date.today().isoformat(), "commit": os.environ.get("GSPO_COMMIT"), "gpu": name,
        "torch": torch.__version__, "overrides": [o for o in chosen if not o.startswith("cache_dir=")],
        "active_params": num_active,
        "bf16_matmul_tflops": bf16_rate / 1e12, "wall_s": wall,
        "peak_gpu_gib": max(r.get("memory/peak_gpu_gib", float("nan")) for r in steps),
        "peak_host_gib": max(r.get("memory/peak_rss_gib", float("nan")) for r in steps),
        "response_length_mean": statistics.mean(r["response_length/mean"] for r in steps),
        "response_tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in steps),
        "phases_s": {k: [r.get(f"time/{k}") for r in steps] for k in ("generate_s", "old_logp_s", "update_s", "step_s")},
        "update_mfu_vs_measured_bf16": mfu,
        "bf16_seq_ratio_noise_floor": first["mismatch/seq_ratio_max"] - 1.0,
        "bf16_logp_abs_diff": first["mismatch/logp_abs_diff"],
        "noise_floor_over_clip_high": (first["mismatch/seq_ratio_max"] - 1.0) / GSPO_CLIP_HIGH,
        "clip_fraction": [r.get("clip/fraction") for r in steps],
    }
    out = Path(args.out or REPO_ROOT / "bench" / "results" / f"gpu-check-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
