"""Update time of a rollout batch with long-tailed response lengths: rows per pass
(`trainer.micro_batch_size`) against a token budget per pass (`trainer.micro_batch_tokens`).

The batch: 64 responses on the benchmark MoE (`model=bench-qwen3-moe`, random weights), 56
of 24-64 tokens and 8 of 512 (a long tail, as RL rollouts have), prompts of 12-20 tokens; one
RL step's update (4 mini-batches, SGD) is timed, nothing else. Configurations alternate
(A B A B ...) and the median of each is reported with the ratio.

    python -m bench.padding --repeats 3
    PYTHONPATH=/path/to/older/checkout python -m bench.padding --only rows   # an older commit's "rows"

Prints one JSON line per configuration and writes them to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

CONFIGS = {
    "rows": dict(micro_batch_size=8),  # 8 rows a pass, every pass as wide as its rows' window
    "tokens": dict(micro_batch_size=0, micro_batch_tokens=8 * (20 + 512)),  # the same peak pass size
}


def long_tailed_batch(vocab: int, generator: torch.Generator):
    """A `Batch` of 64 rows ([prompt (left pad) | response (right pad)]) with long-tailed lengths."""
    from gspo_cli.rollout.generate import Rollout
    from gspo_cli.train.steps import Batch, OldPolicy

    N, P, T = 64, 20, 512
    prompt_lengths = torch.randint(12, P + 1, (N,), generator=generator)
    response_lengths = torch.randint(24, 65, (N,), generator=generator)
    response_lengths[torch.randperm(N, generator=generator)[:8]] = T
    columns = torch.arange(P + T)
    attention = ((columns >= P - prompt_lengths[:, None]) & (columns < P + response_lengths[:, None])).long()
    input_ids = torch.randint(3, vocab, (N, P + T), generator=generator) * attention
    response_mask = attention[:, P:].float()
    old_logp = -5.0 + 0.1 * torch.randn(N, T, generator=generator)
    rollout = Rollout(input_ids, attention, response_mask, [""] * N, logp=old_logp, entropy=torch.zeros(N, T))
    advantages = torch.randn(N, generator=generator)
    return Batch(rollout, advantages, advantages, rollout.entropy, torch.randperm(N, generator=generator),
                 OldPolicy(torch.arange(N), old_logp))


def time_update(model, batch, cfg, trainer_fields: dict) -> float:
    """Seconds of one `update_policy` on a copy of `model` with these trainer fields."""
    from gspo_cli.train.distributed import DistEnv
    from gspo_cli.train.steps import StepContext
    from gspo_cli.train.update import update_policy

    known = {k: v for k, v in trainer_fields.items() if hasattr(cfg.trainer, k)}  # an older checkout lacks some
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **known))
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    ctx = StepContext(cfg, None, None, DistEnv(), torch.Generator().manual_seed(0))
    start = time.perf_counter()
    update_policy(policy, optimizer, scheduler, batch, ctx)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(CONFIGS), nargs="*", default=sorted(CONFIGS))
    parser.add_argument("--out", default="bench/results/padding.jsonl")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gspo_cli.cli import CONF_DIR
    from gspo_cli.config import register_configs
    from gspo_cli.models.build import built_model_dir
    from gspo_cli.models.loading import load_model

    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=[
            "model=bench-qwen3-moe", "model.build.max_position_embeddings=640", "logger=none",
            "algo.routing_volatility=false", "trainer.prompts_per_step=8", "trainer.group_size=8",
            "trainer.max_new_tokens=512"]))
    model = load_model(built_model_dir(cfg.model, Path(cfg.cache_dir).expanduser()))
    batch = long_tailed_batch(cfg.model.build.vocab_size, torch.Generator().manual_seed(0))
    seconds = {name: [] for name in args.only}
    for _ in range(args.repeats):  # A B A B: drifts of the machine hit both alike
        for name in args.only:
            seconds[name].append(time_update(model, batch, cfg, CONFIGS[name]))
    records = [{"config": name, **CONFIGS[name], "median_s": statistics.median(s), "seconds": s,
                "threads": args.threads, "real_tokens": int(batch.rollout.response_mask.sum())}
               for name, s in seconds.items()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for record in records:
            print(json.dumps(record))
            f.write(json.dumps(record) + "\n")
    if len(records) == 2:
        print(f"rows / tokens: {records[0]['median_s'] / records[1]['median_s']:.2f}x")


if __name__ == "__main__":
    main()
