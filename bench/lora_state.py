"""Training state of full fine-tuning against LoRA, counted from a model (docs/lora.md).

Full fine-tuning with AdamW keeps four float32 values per parameter (weight, gradient, two
moments); LoRA keeps the frozen weights and four values per adapter parameter.

    python -m bench.lora_state MODEL_DIR [--rank 8]

MODEL_DIR: any Hugging Face causal-LM directory, e.g. the built benchmark model in the cache
(`~/.cache/gspo/models/bench-qwen3-moe-*` after a `gspo train model=bench-qwen3-moe` run).
"""

from __future__ import annotations

import argparse

from gspo_cli.config import LoraAdapterConfig
from gspo_cli.models.loading import load_model
from gspo_cli.models.lora import add_adapters, trainable_parameters

MIB = 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--rank", type=int, default=8, help="model.lora.rank (default targets)")
    args = parser.parse_args(argv)
    model = load_model(args.model_dir)
    total = sum(p.numel() for p in model.parameters())
    adapted = add_adapters(model, LoraAdapterConfig(rank=args.rank), seed=0)
    trainable = sum(p.numel() for p in trainable_parameters(adapted))
    print(f"parameters {total:,}; LoRA rank {args.rank}: {trainable:,} train ({100 * trainable / total:.1f}%)")
    print(f"full fine-tuning: weights + gradients + AdamW moments = {4 * total * 4 / MIB:.0f} MiB")
    print(f"LoRA: frozen weights {total * 4 / MIB:.0f} MiB + adapters' four values "
          f"{4 * trainable * 4 / MIB:.0f} MiB = {(total + 4 * trainable) * 4 / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
