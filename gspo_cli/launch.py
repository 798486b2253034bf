"""Run a composed training config in this process, or under torchrun when it needs several.

With a world size above 1 the CLI composes and resolves the config once, writes it into the
run directory, and starts `python -m torch.distributed.run ... -m gspo_cli.launch RUN_DIR`:
every rank reads the same file, so all ranks train the same configuration, and there is one
run directory, one `metrics.jsonl` and one W&B run (rank 0 logs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gspo_cli.config import HardwareConfig, TrainConfig

RESOLVED_CONFIG = "config.yaml"


def world_size(hardware: HardwareConfig) -> int:
    """Processes in the job."""
    return hardware.nproc_per_node * hardware.nnodes


def write_resolved_config(cfg: TrainConfig, run_dir: Path) -> Path:
    """Write the fully resolved config to `RUN_DIR/config.yaml` (what every rank will read)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_CONFIG
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    return path


def read_resolved_config(run_dir: Path) -> TrainConfig:
    """The typed config written by `write_resolved_config`."""
    schema = OmegaConf.structured(TrainConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(run_dir / RESOLVED_CONFIG)))  # type: ignore[return-value]


def torchrun_command(hardware: HardwareConfig, run_dir: Path) -> list[str]:
    """The torchrun command line for this hardware entry.

    One node uses `--standalone` (a local rendezvous on a free port); several nodes use the
    c10d rendezvous at `hardware.rdzv_endpoint`, as torchrun expects on SLURM or any cluster.
    """
    command = [sys.executable, "-m", "torch.distributed.run",
               f"--nproc_per_node={hardware.nproc_per_node}", f"--nnodes={hardware.nnodes}"]
    if hardware.nnodes == 1 and not hardware.rdzv_endpoint:
        command.append("--standalone")
    else:
        if not hardware.rdzv_endpoint:
            raise ValueError("hardware.rdzv_endpoint (host:port) is required for several nodes")
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={hardware.rdzv_endpoint}",
                    f"--rdzv_id={hardware.rdzv_id}"]
    return command + ["-m", "gspo_cli.launch", str(run_dir)]


def run(cfg: TrainConfig, run_dir: Path) -> dict:
    """Train in this process (world size 1) or under torchrun; returns the final record (rank 0)."""
    from gspo_cli.train.loop import train

    write_resolved_config(cfg, run_dir)
    if world_size(cfg.hardware) == 1:
        return train(cfg, run_dir)
    code = subprocess.call(torchrun_command(cfg.hardware, run_dir))
    if code != 0:
        raise SystemExit(f"torchrun exited with status {code}")
    from gspo_cli.report.plots import read_metrics

    records = read_metrics(run_dir)
    return {k: v for r in records for k, v in r.items()}  # the latest value of every metric


def worker_main(argv: list[str] | None = None) -> None:
    """Entry point of each torchrun rank: `python -m gspo_cli.launch RUN_DIR`."""
    from gspo_cli.train.loop import train

    run_dir = Path((argv or sys.argv[1:])[0])
    train(read_resolved_config(run_dir), run_dir)


if __name__ == "__main__":
    worker_main()
