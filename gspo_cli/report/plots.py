"""Plots of training curves, made from the `metrics.jsonl` files of run directories.

`plot_runs` draws runs side by side (`gspo plot`); `plot_groups` draws a sweep's groups of
seeds as a mean line with a 95% t-interval band over seeds (`gspo report`; none at n = 1),
`plot_by_setting` and `plot_comparison` draw means and paired differences with error bars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from gspo_cli.report.stats import Interval, mean_interval

DEFAULT_METRICS = ("reward/mean", "clip/fraction", "eval/accuracy")
LOG_SCALE = {"clip/fraction"}  # GSPO and GRPO clip rates differ by orders of magnitude


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl`, in order.

    A last line cut short (a job killed while writing it) is dropped; a broken line
    anywhere else is an error.
    """
    path = Path(run_dir) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record: {line[:80]!r}") from None
    return records


def run_label(run_dir: Path, records: list[dict]) -> str:
    """A legend label: the algorithm from the run's saved config when there is one."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        replay = " + routing replay" if cfg.algo.get("routing_replay") else ""
        return f"{cfg.algo.name}{replay} (seed {cfg.seed})"
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
    return finish_figure(fig, axes[0], metrics, out)


def finish_figure(fig, axes, metrics, out: str | Path, title: str | None = None, legend_size=None) -> Path:
    """Title, axis labels and scales of each panel, then the PNG written to `out`."""
    for ax, name in zip(axes, metrics):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name in LOG_SCALE:
            ax.set_yscale("symlog", linthresh=1e-4)  # log scale that also shows steps with 0
    axes[0].legend(fontsize=legend_size)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Lay out `fig`, write it to `out` as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- sweeps: mean and band over seeds


def values_by_step(curves: list[list[tuple[int, float]]]) -> dict[int, list[float]]:
    """step -> the values the runs logged at it (runs that stopped earlier are absent there)."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return by_step


def mean_band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over runs at each step any of them logged.

    Args:
        curves: One list of (step, value) per run (e.g. one per seed); steps may differ
            where a run stopped early, and then only the runs that reached a step count there.

    Returns:
        (steps, mean, low, high), each of length S (the distinct steps, ascending).
    """
    by_step = values_by_step(curves)
    steps = sorted(by_step)
    return (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def mean_interval_band(curves: list[list[tuple[int, float]]]
                       ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean and 95% t interval over runs at each step any of them logged (`stats.mean_interval`);
    where only one run reached a step, low = high = its value (no band).

    Returns:
        (steps, mean, low, high), each of length S (the distinct steps, ascending).
    """
    by_step = values_by_step(curves)
    steps = sorted(by_step)
    intervals = [mean_interval(by_step[s]) for s in steps]
    return (steps, [i.estimate for i in intervals], [i.estimate if i.low is None else i.low for i in intervals],
            [i.estimate if i.high is None else i.high for i in intervals])


def plot_groups(groups: dict[str, list[list[dict]]], metrics: tuple[str, ...], out: str | Path,
                title: str = "") -> Path:
    """One panel per metric, one line per group (mean over its runs) with a 95% t-interval band
    over its runs (none where one run reached a step); the legend gives each group's n.

    Args:
        groups: Label (e.g. the algorithm) to the metric records of each of its runs.
        metrics: Metric names, one panel each; those in `LOG_SCALE` get a log y axis.
        out: PNG file to write.
        title: Figure title (e.g. the sweep name and the number of seeds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, name in zip(axes[0], metrics):
        for label, runs in groups.items():
            curves = [[(r["step"], r[name]) for r in records if name in r] for records in runs]
            steps, mean, low, high = mean_interval_band([c for c in curves if c])
            if not steps:
                continue
            line, = ax.plot(steps, mean, label=f"{label} (n={len(runs)})",
                            marker="o" if name.startswith("eval/") else None, markersize=3)
            if name in LOG_SCALE:  # a share: the band's t interval may reach below 0
                low = [max(v, 0.0) for v in low]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return finish_figure(fig, axes[0], metrics, out, title, legend_size=8)


def plot_volatility(groups: dict[str, list[list[dict]]], out: str | Path, title: str = "") -> Path:
    """Expert volatility (GSPO paper §5.3): the share of activated experts one optimizer step
    changes, per RL step (mean over its mini-batches, band over runs), and by mini-batch index
    (mean over steps and runs: the k-th update of a rollout batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6), squeeze=False)
    over_steps, by_index = axes[0]
    for label, runs in groups.items():
        curves = [[(r["step"], r["routing/volatility"]) for r in records if "routing/volatility" in r]
                  for records in runs]
        steps, mean, low, high = mean_band([c for c in curves if c])
        if not steps:
            continue
        line, = over_steps.plot(steps, mean, label=f"{label} (n={len(runs)})")
        over_steps.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        per_index: dict[int, list[float]] = {}
        for records in runs:
            for r in records:
                for name, value in r.items():
                    if name.startswith("routing/volatility/minibatch_"):
                        per_index.setdefault(int(name.rsplit("_", 1)[1]), []).append(value)
        index = sorted(per_index)
        by_index.plot(index, [sum(per_index[i]) / len(per_index[i]) for i in index], marker="o",
                      color=line.get_color(), label=label)
    from matplotlib.ticker import MaxNLocator

    by_index.xaxis.set_major_locator(MaxNLocator(integer=True))
    over_steps.set(title="routing/volatility", xlabel="step")
    by_index.set(title="by mini-batch (update) index", xlabel="mini-batch")
    for ax in (over_steps, by_index):
        ax.grid(alpha=0.3)
    over_steps.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def plot_by_setting(series: dict[str, list[tuple[str, dict[str, Optional[Interval]]]]], out: str | Path) -> Path:
    """Results against another swept setting (e.g. the response length): one panel per figure
    (final accuracy, accuracy gained, clip fraction, response length), one line per algorithm,
    the settings on the x axis in the order given; each point the mean over seeds with its 95%
    t interval as an error bar, and its n written beside it (n=1: no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(series.values()))[0][1]) if series else []
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 3.8), squeeze=False)
    settings = list(dict.fromkeys(setting for points in series.values() for setting, _ in points))
    for ax, name in zip(axes[0], names):
        for algo, points in series.items():
            known = [(settings.index(setting), values[name]) for setting, values in points if values[name] is not None]
            if not known:
                continue
            x, y = [k for k, _ in known], [v.estimate for _, v in known]
            err = [[v.estimate - v.low if v.low is not None else 0.0 for _, v in known],
                   [v.high - v.estimate if v.high is not None else 0.0 for _, v in known]]
            if name in LOG_SCALE:  # a share: no bar below 0
                err[0] = [min(e, v) for e, v in zip(err[0], y)]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=algo)
            for xi, (_, v) in zip(x, known):
                ax.annotate(f"n={v.n}", (xi, v.estimate), textcoords="offset points", xytext=(4, 4), fontsize=6)
        ax.set_xticks(range(len(settings)), settings, rotation=20, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if name in LOG_SCALE:
            values = [v[name].estimate for points in series.values() for _, v in points if v[name] is not None]
            if values and min(values) > 0:  # means over steps: a plain log axis, no symlog band around 0
                ax.set_yscale("log")
            else:
                ax.set_yscale("symlog", linthresh=1e-4)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out)


def plot_comparison(stats: list[Any], baseline: str, out: str | Path) -> Path:
    """Each group's final accuracy minus its baseline's (`uncertainty.GroupStats`), paired per
    (seed, problem): the difference with its 95% interval as an error bar, p (and, with several
    comparisons, Holm's adjusted p) and the number of seeds in the label; a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in stats if g.comparison is not None and g.comparison.problems is not None]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * max(len(rows), 1) + 1.6))
    for i, g in enumerate(rows):
        p = g.comparison.problems
        low, high = (p.diff, p.diff) if p.low is None else (p.low, p.high)
        ax.errorbar([p.diff], [i], xerr=[[p.diff - low], [high - p.diff]], fmt="o", capsize=4)
        pval = "" if p.p is None else f", p={p.p:.2g}"
        if g.comparison.p_holm is not None and len(rows) > 1:
            pval += f" (Holm {g.comparison.p_holm:.2g})"
        ax.annotate(f"{p.diff:+.3f}{pval}, seeds={len(g.comparison.seeds)}", (p.diff, i), textcoords="offset points",
                    xytext=(0, 6), fontsize=7, ha="center")
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_ylim(-0.6, max(len(rows), 1) - 0.2)  # room for the top row's label
    ax.set_yticks(range(len(rows)), [f"{g.label}\nvs {g.comparison.baseline}" for g in rows], fontsize=7)
    ax.set_xlabel("final accuracy − baseline's (95% interval, paired per seed and problem)")
    ax.set_title(f"against the baseline {baseline}", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, out)
