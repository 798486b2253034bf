"""`gspo` command line: `gspo train [overrides]`.

`gspo <command> ARGS` hands ARGS to a Hydra application composed from `conf/<command>.yaml`,
so every Hydra flag works (`--cfg job`, `--help`, `-m`, `hydra.run.dir=...`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gspo_cli.config import TrainConfig, register_configs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
USAGE = """usage: gspo <command> [hydra overrides]

commands:
  train    RL training (GSPO, GRPO, ...): gspo train algo=grpo trainer.max_steps=100
  plot     curves of finished runs:       gspo plot outputs/A outputs/B --out curves.png
  help     this message

Config groups and their options: gspo train --help
"""


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_app(cfg: DictConfig) -> float:
    """Hydra entry point of `gspo train`; returns the final accuracy (for sweepers)."""
    from gspo_cli.train import train

    typed: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    record = train(typed, run_dir)
    return float(record.get("eval/accuracy", 0.0))


def plot_command(args: list[str]) -> None:
    """`gspo plot RUN_DIR... [--out FILE.png]`: training curves of runs side by side."""
    import argparse

    from gspo_cli.plots import plot_runs

    parser = argparse.ArgumentParser(prog="gspo plot", description=plot_command.__doc__)
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    parser.add_argument("--metrics", default="reward/mean,clip/fraction,eval/accuracy",
                        help="comma-separated metric names, one panel each")
    opts = parser.parse_args(args)
    print(plot_runs(opts.run_dirs, opts.out, tuple(opts.metrics.split(","))))


HYDRA_COMMANDS = {"train": train_app}
PLAIN_COMMANDS = {"plot": plot_command}


def main(argv: list[str] | None = None) -> None:
    """Dispatch `gspo <command>` to its Hydra application."""
    argv = sys.argv[1:] if argv is None else argv
    command, args = (argv[0], argv[1:]) if argv else ("help", [])
    if command in PLAIN_COMMANDS:
        PLAIN_COMMANDS[command](args)
    elif command in HYDRA_COMMANDS:
        register_configs()
        sys.argv = [f"gspo {command}", *args]  # Hydra parses sys.argv
        HYDRA_COMMANDS[command]()
    elif command in ("help", "-h", "--help"):
        print(USAGE)
    else:
        print(f"gspo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
