"""Plots of training curves, made from the `metrics.jsonl` files of run directories."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_METRICS = ("reward/mean", "clip/fraction", "eval/accuracy")
LOG_SCALE = {"clip/fraction"}  # GSPO and GRPO clip rates differ by orders of magnitude


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl`, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_label(run_dir: Path, records: list[dict]) -> str:
    """A legend label: the algorithm from the run's saved config when there is one."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        return f"{cfg.algo.name} (seed {cfg.seed})"
    return run_dir.name


def plot_runs(run_dirs: list[str | Path], out: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    """One panel per metric, one line per run, step on the x axis; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for run_dir in map(Path, run_dirs):
        records = read_metrics(run_dir)
        label = run_label(run_dir, records)
        for ax, name in zip(axes[0], metrics):
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if name.startswith("eval/") else None, markersize=3)
    for ax, name in zip(axes[0], metrics):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name in LOG_SCALE:
            ax.set_yscale("symlog", linthresh=1e-4)  # log scale that also shows steps with 0
    axes[0][0].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
