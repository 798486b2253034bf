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
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from gspo_cli.report import uncertainty
from gspo_cli.report.eval_records import read_eval_correct
from gspo_cli.report.plots import plot_by_setting, plot_comparison, plot_groups, plot_volatility, read_metrics
# steps_to_target and by_setting: also imported from here
from gspo_cli.report.summary import (DEFAULT_TARGET, RunSummary, by_setting, grouped, other_overrides,  # noqa: F401
                                     steps_to_target, summarize_records)

JOB_FILE = "job.json"  # written by `gspo sweep`/`gspo train` when a job ends: status and wall time
CURVE_METRICS = ("eval/accuracy", "reward/mean")
CLIP_METRICS = ("clip/fraction", "clip/fraction_nonzero_adv", "reward/uniform_groups")


# ---------------------------------------------------------------------------- the grid


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
    figures = summarize_records(records, max_steps, target, read_eval_correct(run_dir))
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


def write_summary_csv(summaries: list[RunSummary], path: Path,
                      group_columns: Optional[dict[str, dict[str, Any]]] = None) -> Path:
    """`summary.csv`: one row per run, the `RunSummary` fields as columns, then the columns of
    its group (`uncertainty.group_columns`, by job: empty for runs in no group)."""
    group_columns = group_columns or {}
    extra = list(dict.fromkeys(k for columns in group_columns.values() for k in columns))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(RunSummary)] + extra)
        writer.writeheader()
        for summary in summaries:
            row = {**dict.fromkeys(extra), **asdict(summary), **group_columns.get(summary.job, {})}
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                             for k, v in row.items()})
    return path


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def runs_table(summaries: list[RunSummary], title: str):
    """Rich table of `summary.csv`."""
    from rich.table import Table

    extra = {s.job: other_overrides(s.overrides) for s in summaries}
    show_extra = any(extra.values())  # the algo and seed columns already say the rest
    table = Table(title=title)
    names = ["job", "algo", "seed", *(["overrides"] if show_extra else []), "status", "final acc [95% CI]",
             "best (step)", "clip frac", "steps to target", "wall s"]
    for name in names:
        table.add_column(name, justify="left" if name in ("job", "algo", "overrides", "status") else "right")
    for s in summaries:
        best = "–" if s.best_accuracy is None else f"{s.best_accuracy:.3f} ({s.best_step})"
        status = s.status if s.status != "incomplete" else f"stopped {s.last_step}/{s.max_steps}"
        algo, seed = (s.algo, "" if s.seed is None else str(s.seed)) if s.algo else (s.overrides, "")
        table.add_row(s.job, algo, seed, *([extra[s.job]] if show_extra else []), status,
                      _fmt(s.final_accuracy) + ("" if s.final_ci_low is None else
                                                f" [{s.final_ci_low:.3f}, {s.final_ci_high:.3f}]"),
                      best, _fmt(s.mean_clip_fraction, ".1e"),
                      "–" if s.steps_to_target is None else str(s.steps_to_target), _fmt(s.wall_time_s, ".0f"))
    return table


def groups_table(summaries: list[RunSummary], target: float, stats: list[uncertainty.GroupStats]):
    """Rich table per algorithm (and other swept settings): over its finished seeds, the final
    accuracy as mean [95% t interval] n, the rest as mean (min–max) or mean."""
    from rich.table import Table

    groups = grouped(summaries)
    moe = any(r.mean_volatility is not None for runs in groups.values() for r in runs)
    table = Table(title="finished runs per algorithm: final acc = mean [95% t-interval over seeds] n (n=1: one "
                        "seed, no interval); others mean (min–max) over seeds")
    names = ["group", "runs", "start acc", "final acc", "best acc", "collapsed", "clip frac", "clip frac A≠0",
             "uniform groups", *(["volatility"] if moe else []), "resp len", f"reached {target:g}"]
    for name in names:
        table.add_column(name, justify="left" if name == "group" else "right")
    final = {g.label: g.final for g in stats}
    for label, runs in groups.items():
        reached = sum(r.steps_to_target is not None for r in runs)
        within = sum(r.collapse == uncertainty.WITHIN_NOISE for r in runs)
        table.add_row(label, str(len(runs)), _mean_range([r.start_accuracy for r in runs]),
                      uncertainty.fmt_interval(final.get(label)), _mean_range([r.best_accuracy for r in runs]),
                      f"{sum(bool(r.collapsed) for r in runs)}/{len(runs)}" + (f" ({within} within noise)" if within
                                                                              else ""),
                      _fmt(_mean([r.mean_clip_fraction for r in runs]), ".1e"),
                      _fmt(_mean([r.mean_clip_fraction_nonzero_adv for r in runs]), ".1e"),
                      _fmt(_mean([r.mean_uniform_groups for r in runs]), ".2f"),
                      *([_fmt(_mean([r.mean_volatility for r in runs]), ".3f")] if moe else []),
                      _fmt(_mean([r.mean_response_length for r in runs]), ".0f"), f"{reached}/{len(runs)}")
    return table


def _mean(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _mean_range(values: list[Optional[float]]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(known):.3f} ({min(known):.3f}–{max(known):.3f})" if known else "–"


def build_report(sweep_dir: str | Path, target: float = DEFAULT_TARGET, console=None,
                 baseline: Optional[str] = None) -> list[RunSummary]:
    """Write `summary.csv` and the plots into the sweep directory and print the tables.

    Plots and the per-algorithm table use finished runs only; unfinished and unstarted
    jobs are listed by name. `baseline` (`uncertainty.choose_baseline`: "gspo", "KEY=VALUE",
    None for the first swept value) is what every group is compared with, paired.
    """
    from rich.console import Console

    if console is None:  # a log file or pipe is not 80 columns wide: do not squeeze the tables
        console = Console() if Console().is_terminal else Console(width=200)
    sweep_dir = Path(sweep_dir)
    summaries, records = collect_sweep(sweep_dir, target)
    if not summaries:
        raise FileNotFoundError(f"{sweep_dir} holds no run directories (no */.hydra/config.yaml)")
    groups = grouped(summaries)
    final_correct = {}  # each finished run's final evaluation, per problem
    for runs in groups.values():
        for r in runs:
            found = read_eval_correct(sweep_dir / r.job).get(r.last_step)
            if found is not None:
                final_correct[r.job] = found
    chosen, stats = uncertainty.group_stats(groups, final_correct, baseline)
    csv_path = write_summary_csv(summaries, sweep_dir / "summary.csv", uncertainty.group_columns(stats, groups, chosen))
    console.print(runs_table(summaries, f"sweep {sweep_dir.name}: {len(summaries)} jobs"))
    written = [csv_path]
    if groups:
        console.print(groups_table(summaries, target, stats))
        if chosen is not None:
            console.print(uncertainty.comparison_table(stats, chosen))
            written.append(plot_comparison(stats, chosen, sweep_dir / "vs_baseline.png"))
        for line in uncertainty.comparison_notes(stats) + [uncertainty.collapse_line(r) for runs in groups.values()
                                                           for r in runs if r.collapse]:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        curves = {label: [records[r.job] for r in runs] for label, runs in groups.items()}
        title = f"{sweep_dir.name}: mean over seeds, band = 95% t-interval over seeds (none at n=1)"
        written.append(plot_groups(curves, CURVE_METRICS, sweep_dir / "accuracy_reward.png", title))
        written.append(plot_groups(curves, CLIP_METRICS, sweep_dir / "clip_fraction.png", title))
        if any(r.mean_volatility is not None for runs in groups.values() for r in runs):
            written.append(plot_volatility(curves, sweep_dir / "routing_volatility.png", title))
        settings = {other_overrides(r.overrides) for runs in groups.values() for r in runs}
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
