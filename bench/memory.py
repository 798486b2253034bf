"""Peak resident memory of one training step against response length and batch size.

Each point is one `gspo train` in a child process of its own (1 RL step on the benchmark
model with Qwen3's 151,936-token vocabulary, random weights, so every response runs to
`max_new_tokens`); its peak resident set size is read with `getrusage(RUSAGE_CHILDREN)`.

    python -m bench.memory --lengths 128 512 1024 2048 --prompts 4     # memory against length
    python -m bench.memory --lengths 256 --prompts 2 4 8 16            # against batch size

Prints one JSON line per point and writes them to `--out` (default bench/results/memory.jsonl).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_VOCAB = 151936


def step_command(length: int, prompts: int, group: int, micro: int, rollout_batch: int, extra: list[str],
                 run_dir: str) -> list[str]:
    return [sys.executable, "-m", "gspo_cli", "train", "model=bench-qwen3-moe",
            f"model.build.vocab_size={QWEN3_VOCAB}", f"model.build.max_position_embeddings={length + 64}",
            f"trainer.max_new_tokens={length}", f"trainer.prompts_per_step={prompts}", f"trainer.group_size={group}",
            f"trainer.micro_batch_size={micro}", f"trainer.rollout_batch_size={rollout_batch}",
            f"trainer.eval_batch_size={rollout_batch or prompts * group}", "task.num_eval=8",
            "trainer.max_steps=1", "trainer.save_final=false", "logger=none", f"hydra.run.dir={run_dir}", *extra]


def measure(command: list[str]) -> dict:
    """Run a child and return its peak RSS (GiB) and wall time; the children's maximum is
    monotone, so each point runs in a fresh process of this script (see `main`)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {"peak_rss_gib": round(peak_kib / 2**20, 2), "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024], help="trainer.max_new_tokens values")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16], help="trainer.prompts_per_step values")
    parser.add_argument("--group", type=int, default=8, help="trainer.group_size")
    parser.add_argument("--micro", type=int, default=4, help="trainer.micro_batch_size")
    parser.add_argument("--rollout-batch", type=int, default=32, help="trainer.rollout_batch_size")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)  # internal: one point, this process
    parser.add_argument("--out", default="bench/results/memory.jsonl")
    parser.add_argument("extra", nargs="*", help="more gspo train overrides")
    args = parser.parse_args(argv)
    if args.point:  # one measurement in a fresh process, so RUSAGE_CHILDREN holds only this child
        length, prompts = args.lengths[0], args.prompts[0]
        with tempfile.TemporaryDirectory() as run_dir:
            result = measure(step_command(length, prompts, args.group, args.micro, args.rollout_batch, args.extra,
                                          run_dir))
        print(json.dumps({"max_new_tokens": length, "prompts": prompts, "group": args.group,
                          "sequences": prompts * args.group, "micro_batch_size": args.micro,
                          "rollout_batch_size": args.rollout_batch, "extra": args.extra, **result}))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        for prompts in args.prompts:
            line = subprocess.run([sys.executable, "-m", "bench.memory", "--point", "--lengths", str(length),
                                   "--prompts", str(prompts), "--group", str(args.group), "--micro", str(args.micro),
                                   "--rollout-batch", str(args.rollout_batch), "--", *args.extra],
                                  capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(line, flush=True)
            with out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
