"""Sweep reports: one summary row per run, a console table and plots, rebuilt from files.

A sweep directory holds one run directory per job (Hydra's `<sweep dir>/<job num>/`), each
with `.hydra/config.yaml`, `.hydra/overrides.yaml` and `metrics.jsonl`; `multirun.yaml` at
the top records the grid. Nothing else is needed, so a report can be made of a sweep that
is still running, was interrupted, or ran on a cluster and was copied back.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from gspo_cli.report.plots import plot_by_setting, plot_groups, plot_volatility, read_metrics

JOB_FILE = "job.json"  # written by `gspo sweep`/`gspo train` when a job ends: status and wall time
# Accuracy whose first crossing `steps_to_target` reports: on the default configuration the
# warm start is at about 0.45 and 80 steps of GSPO or GRPO reach about 0.78 (README, Measured).
DEFAULT_TARGET = 0.7
CURVE_METRICS = ("eval/accuracy", "reward/mean")
CLIP_METRICS = ("clip/fraction",)
VOLATILITY_METRIC = "routing/volatility"  # MoE runs only (GSPO paper §5.3)
# A run collapsed when it ended this far below its best evaluation (or below where it started).
COLLAPSE_DROP = 0.15


@dataclass
class RunSummary:
    """One row of `summary.csv`: what a run reached, or how far it got."""

    job: str
    """Run directory relative to the sweep directory (the Hydra job number by default)."""
    status: str
    """finished, failed, incomplete (stopped early) or not started."""
    algo: str = ""
    """`algo.name` of the run."""
    seed: Optional[int] = None
    """RL seed."""
    overrides: str = ""
    """The swept overrides that made this job, e.g. `algo=grpo seed=1`."""
    final_accuracy: Optional[float] = None
    """`eval/accuracy` at the last step."""
    best_accuracy: Optional[float] = None
    """Highest `eval/accuracy` of any evaluation."""
    best_step: Optional[int] = None
    """Step of the best evaluation (the first, on ties)."""
    start_accuracy: Optional[float] = None
    """`eval/accuracy` at step 0 (the base the run started from)."""
    collapsed: Optional[bool] = None
    """A finished run that ended more than `COLLAPSE_DROP` below its best evaluation, or more than
    5 points below its start: it learned and then lost it, or only lost."""
    mean_clip_fraction: Optional[float] = None
    """`clip/fraction` (a share of response tokens) averaged over the training steps."""
    mean_volatility: Optional[float] = None
    """`routing/volatility` averaged over the training steps (MoE models)."""
    mean_response_length: Optional[float] = None
    """`response_length/mean` (tokens) averaged over the training steps."""
    steps_to_target: Optional[int] = None
    """First evaluated step with `eval/accuracy` ≥ target_accuracy; empty if never reached."""
    target_accuracy: Optional[float] = None
    """The target used for `steps_to_target`."""
    wall_time_s: Optional[float] = None
    """Job wall time, warm start included (file times for jobs that did not end)."""
    last_step: Optional[int] = None
    """Last step in `metrics.jsonl`."""
    max_steps: Optional[int] = None
    """`trainer.max_steps` of the run."""
    error: str = ""
    """First line of the error of a failed job."""


# ---------------------------------------------------------------------------- pure summaries


def steps_to_target(points: list[tuple[int, float]], target: float) -> Optional[int]:
    """First step whose value reaches `target`, from (step, value) pairs in step order; None if never."""
    return next((step for step, value in points if value >= target), None)


def summarize_records(records: list[dict], max_steps: int, target: float) -> dict[str, Any]:
    """Accuracy, clipping and progress figures of one run's `metrics.jsonl` records.

    A run has finished when its last record is the final evaluation at `max_steps`.
    """
    accuracy = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    last = records[-1] if records else {}
    finished = last.get("step") == max_steps and "eval/accuracy" in last
    best = max(accuracy, key=lambda p: p[1], default=(None, None))  # max keeps the first of ties
    start = accuracy[0][1] if accuracy and accuracy[0][0] == 0 else None
    final = last["eval/accuracy"] if finished else None
    collapsed = None if final is None else bool(
        final < best[1] - COLLAPSE_DROP or (start is not None and final < start - 0.05))
    return {
        "finished": finished,
        "final_accuracy": final,
        "best_accuracy": best[1],
        "best_step": best[0],
        "start_accuracy": start,
        "collapsed": collapsed,
        "mean_clip_fraction": _mean_of(records, "clip/fraction"),
        "mean_volatility": _mean_of(records, VOLATILITY_METRIC),
        "mean_response_length": _mean_of(records, "response_length/mean"),
        "steps_to_target": steps_to_target(accuracy, target),
        "last_step": last.get("step"),
    }


def _mean_of(records: list[dict], name: str) -> Optional[float]:
    values = [r[name] for r in records if name in r]
    return sum(values) / len(values) if values else None


def parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's own parse of override strings (`Override` objects)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def grid(sweeper_params: dict[str, str], cli_overrides: list[str]) -> tuple[set[str], list[list[str]]]:
    """The swept keys and every job's overrides, in launch order, as Hydra's basic sweeper makes them.

    Command-line overrides come after the sweeper's `params`, so they replace a param of the
    same key (that is how `gspo sweep seed=0` narrows the default grid).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = parse_overrides([f"{k}={v}" for k, v in sweeper_params.items()] + list(cli_overrides))
    last = {o.get_key_element(): o for o in parsed}  # the last override of a key wins
    swept = {key for key, o in last.items() if o.is_sweep_override()}
    return swept, BasicSweeper.split_arguments(parsed, None)[0]


def job_label(summary: RunSummary) -> str:
    """Plot and table group of a run: its algorithm plus any swept override but the seed."""
    return " ".join([summary.algo or "?", _other_overrides(summary.overrides)]).strip()


# ---------------------------------------------------------------------------- reading a sweep directory


def read_planned(sweep_dir: Path) -> tuple[Optional[set[str]], Optional[list[list[str]]]]:
    """Swept keys and planned jobs from `multirun.yaml`; (None, None) when it is absent."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None, None
    hydra_cfg = OmegaConf.load(path).hydra
    params = OmegaConf.to_container(hydra_cfg.sweeper.get("params") or {}) or {}
    task_overrides = list(hydra_cfg.overrides.task)
    swept, jobs = grid({str(k): str(v) for k, v in params.items()}, task_overrides)
    if "BasicSweeper" not in str(hydra_cfg.sweeper.get("_target_", "")):
        return swept, None  # other sweepers (Optuna, ...) choose jobs as they go: no plan to compare with
    return swept, jobs


def read_run(run_dir: Path, sweep_dir: Path, swept: Optional[set[str]], target: float
             ) -> tuple[RunSummary, list[dict], list[str]]:
    """Summarize one run directory; also return its records and its job overrides."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    job_overrides = [str(o) for o in OmegaConf.load(overrides_path)] if overrides_path.exists() else []
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    max_steps = int(cfg.trainer.max_steps)
    figures = summarize_records(records, max_steps, target)
    job_info = json.loads((run_dir / JOB_FILE).read_text()) if (run_dir / JOB_FILE).exists() else {}
    finished = figures.pop("finished")
    status = "failed" if job_info.get("status") == "failed" else "finished" if finished else "incomplete"
    keys = swept if swept is not None else set()
    shown = [o for o, p in zip(job_overrides, parse_overrides(job_overrides)) if p.get_key_element() in keys]
    wall = job_info.get("wall_time_s")
    if wall is None and records:  # a job that never ended: from its start to its last log line
        wall = (run_dir / "metrics.jsonl").stat().st_mtime - (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    summary = RunSummary(job=str(run_dir.relative_to(sweep_dir)), status=status, algo=str(cfg.algo.name),
                         seed=int(cfg.seed), overrides=" ".join(shown), target_accuracy=target,
                         wall_time_s=wall, max_steps=max_steps, error=job_info.get("error", ""), **figures)
    return summary, records, job_overrides


def collect_sweep(sweep_dir: str | Path, target: float = DEFAULT_TARGET
                  ) -> tuple[list[RunSummary], dict[str, list[dict]]]:
    """Every run of a sweep, planned jobs that never started included, and each run's records.

    Returns:
        (summaries in job order, records by `RunSummary.job`).
    """
    sweep_dir = Path(sweep_dir)
    swept, planned = read_planned(sweep_dir)
    run_dirs = sorted((p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")),
                      key=lambda p: (len(p.parts), int(p.name) if p.name.isdigit() else 0, str(p)))
    if swept is None:  # no multirun.yaml: the swept keys are the ones whose value differs between runs
        values: dict[str, set[str]] = {}
        for run_dir in run_dirs:
            path = run_dir / ".hydra" / "overrides.yaml"
            for o in parse_overrides([str(x) for x in OmegaConf.load(path)] if path.exists() else []):
                values.setdefault(o.get_key_element(), set()).add(o.get_value_element_as_str())
        swept = {k for k, v in values.items() if len(v) > 1}
    summaries, records, seen = [], {}, set()
    for run_dir in run_dirs:
        summary, run_records, job_overrides = read_run(run_dir, sweep_dir, swept, target)
        summaries.append(summary)
        records[summary.job] = run_records
        seen.add(frozenset(job_overrides))
    for num, job in enumerate(planned or []):
        if frozenset(job) not in seen:
            shown = [o for o, p in zip(job, parse_overrides(job)) if p.get_key_element() in swept]
            summaries.append(RunSummary(job=str(num), status="not started", overrides=" ".join(shown),
                                        target_accuracy=target))
    summaries.sort(key=lambda s: (0, int(s.job)) if s.job.isdigit() else (1, 0))  # stable: others keep their order
    return summaries, records


# ---------------------------------------------------------------------------- outputs


def write_summary_csv(summaries: list[RunSummary], path: Path) -> Path:
    """`summary.csv`: one row per run, the `RunSummary` fields as columns."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(RunSummary)])
        writer.writeheader()
        for summary in summaries:
            row = asdict(summary)
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                             for k, v in row.items()})
    return path


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def runs_table(summaries: list[RunSummary], title: str):
    """Rich table of `summary.csv`."""
    from rich.table import Table

    extra = {s.job: _other_overrides(s.overrides) for s in summaries}
    show_extra = any(extra.values())  # the algo and seed columns already say the rest
    table = Table(title=title)
    names = ["job", "algo", "seed", *(["overrides"] if show_extra else []), "status", "final acc",
             "best (step)", "clip frac", "steps to target", "wall s"]
    for name in names:
        table.add_column(name, justify="left" if name in ("job", "algo", "overrides", "status") else "right")
    for s in summaries:
        best = "–" if s.best_accuracy is None else f"{s.best_accuracy:.3f} ({s.best_step})"
        status = s.status if s.status != "incomplete" else f"stopped {s.last_step}/{s.max_steps}"
        algo, seed = (s.algo, "" if s.seed is None else str(s.seed)) if s.algo else (s.overrides, "")
        table.add_row(s.job, algo, seed, *([extra[s.job]] if show_extra else []), status,
                      _fmt(s.final_accuracy), best, _fmt(s.mean_clip_fraction, ".1e"),
                      "–" if s.steps_to_target is None else str(s.steps_to_target), _fmt(s.wall_time_s, ".0f"))
    return table


def _other_overrides(overrides: str) -> str:
    return " ".join(o for o in overrides.split() if not o.startswith(("seed=", "algo=")))


def groups_table(summaries: list[RunSummary], target: float):
    """Rich table per algorithm (and other swept settings): mean and range over finished seeds."""
    from rich.table import Table

    groups = grouped(summaries)
    moe = any(r.mean_volatility is not None for runs in groups.values() for r in runs)
    table = Table(title="finished runs per algorithm: mean (min–max) over seeds")
    names = ["group", "runs", "start acc", "final acc", "best acc", "collapsed", "clip frac",
             *(["volatility"] if moe else []), "resp len", f"reached {target:g}"]
    for name in names:
        table.add_column(name, justify="left" if name == "group" else "right")
    for label, runs in groups.items():
        reached = sum(r.steps_to_target is not None for r in runs)
        table.add_row(label, str(len(runs)), _mean_range([r.start_accuracy for r in runs]),
                      _mean_range([r.final_accuracy for r in runs]), _mean_range([r.best_accuracy for r in runs]),
                      f"{sum(bool(r.collapsed) for r in runs)}/{len(runs)}",
                      _fmt(_mean([r.mean_clip_fraction for r in runs]), ".1e"),
                      *([_fmt(_mean([r.mean_volatility for r in runs]), ".3f")] if moe else []),
                      _fmt(_mean([r.mean_response_length for r in runs]), ".0f"), f"{reached}/{len(runs)}")
    return table


def _mean(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _mean_range(values: list[Optional[float]]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.3f} ({min(known):.3f}–{max(known):.3f})" if known else "–"


def by_setting(groups: dict[str, list[RunSummary]]) -> dict[str, list[tuple[str, dict[str, Optional[float]]]]]:
    """Per algorithm, its groups' means over seeds at each other swept setting (e.g. a response
    length), in the order the settings first appear: what `plot_by_setting` draws."""
    series: dict[str, list[tuple[str, dict[str, Optional[float]]]]] = {}
    for runs in groups.values():
        first = runs[0]
        gains = [None if r.final_accuracy is None or r.start_accuracy is None else r.final_accuracy - r.start_accuracy
                 for r in runs]
        series.setdefault(first.algo, []).append((_other_overrides(first.overrides), {
            "final eval/accuracy": _mean([r.final_accuracy for r in runs]),
            # each setting has a base of its own (a warm start per response length): the gain compares them
            "eval/accuracy gained (final - step 0)": _mean(gains),
            "clip/fraction": _mean([r.mean_clip_fraction for r in runs]),
            "response_length/mean": _mean([r.mean_response_length for r in runs]),
        }))
    return series


def grouped(summaries: list[RunSummary]) -> dict[str, list[RunSummary]]:
    """Finished runs by `job_label`, in order of first appearance."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        if s.status == "finished":
            groups.setdefault(job_label(s), []).append(s)
    return groups


def build_report(sweep_dir: str | Path, target: float = DEFAULT_TARGET, console=None) -> list[RunSummary]:
    """Write `summary.csv` and the plots into the sweep directory and print the tables.

    Plots and the per-algorithm table use finished runs only; unfinished and unstarted
    jobs are listed by name.
    """
    from rich.console import Console

    if console is None:  # a log file or pipe is not 80 columns wide: do not squeeze the table
        console = Console() if Console().is_terminal else Console(width=120)
    sweep_dir = Path(sweep_dir)
    summaries, records = collect_sweep(sweep_dir, target)
    if not summaries:
        raise FileNotFoundError(f"{sweep_dir} holds no run directories (no */.hydra/config.yaml)")
    csv_path = write_summary_csv(summaries, sweep_dir / "summary.csv")
    console.print(runs_table(summaries, f"sweep {sweep_dir.name}: {len(summaries)} jobs"))
    groups = grouped(summaries)
    written = [csv_path]
    if groups:
        console.print(groups_table(summaries, target))
        curves = {label: [records[r.job] for r in runs] for label, runs in groups.items()}
        title = f"{sweep_dir.name}: mean over seeds, band = min–max"
        written.append(plot_groups(curves, CURVE_METRICS, sweep_dir / "accuracy_reward.png", title))
        written.append(plot_groups(curves, CLIP_METRICS, sweep_dir / "clip_fraction.png", title))
        if any(r.mean_volatility is not None for runs in groups.values() for r in runs):
            written.append(plot_volatility(curves, sweep_dir / "routing_volatility.png", title))
        settings = {_other_overrides(r.overrides) for runs in groups.values() for r in runs}
        if len(settings) > 1:  # another swept setting besides algo and seed: results against it
            written.append(plot_by_setting(by_setting(groups), sweep_dir / "by_setting.png"))
    for s in summaries:
        if s.status == "incomplete":
            console.print(f"not finished: job {s.job} ({s.overrides}) stopped at step {s.last_step} of {s.max_steps}",
                          markup=False, highlight=False, soft_wrap=True)
        elif s.status in ("failed", "not started"):
            console.print(f"{s.status}: job {s.job} ({s.overrides}){': ' + s.error if s.error else ''}",
                          markup=False, highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in written), markup=False, highlight=False, soft_wrap=True)
    return summaries


@contextlib.contextmanager
def record_job(run_dir: Path):
    """Write `job.json` in the run directory when the body ends: status, wall time, error."""
    start = time.time()
    info: dict[str, Any] = {"status": "finished"}
    try:
        yield
    except BaseException as exc:  # KeyboardInterrupt too: the job did not finish
        info = {"status": "failed" if isinstance(exc, Exception) else "interrupted",
                "error": f"{type(exc).__name__}: {exc}".strip().splitlines()[0]}
        raise
    finally:
        info.update(started=start, wall_time_s=time.time() - start)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / JOB_FILE).write_text(json.dumps(info) + "\n")
