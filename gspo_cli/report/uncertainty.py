"""How sure a sweep report is: intervals per run and per group, paired comparisons with a baseline,
and the collapse verdict measured against its own noise.

Built on `stats` (the formulas) and `eval_records` (which problems each evaluation answered
correctly). The choices, stated once (docs/sweeps-and-eval.md, "How sure the report is"):

- a run's final accuracy: Wilson score interval over its held-out problems;
- a group (algorithm and other swept settings): mean over its finished seeds with Student's t
  interval (n − 1 degrees of freedom); at n = 1 no interval, and the cell says n=1;
- a group against the baseline at the same other settings: paired per (seed, problem) on the
  seeds both finished and the problems both evaluated (same digest), each problem one cluster
  (its seeds' pairs averaged): the paired t interval and p-value of the difference in accuracy
  over problems; also, from 2 shared seeds on, the t interval over the per-seed differences
  (run-to-run noise, which pairing on problems does not see);
- a collapse: the threshold rule of `sweep.summarize_records` *and* a drop larger than its
  interval (the paired interval of final − reference evaluation lies below 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gspo_cli.report.eval_records import EvalCorrect
from gspo_cli.report.stats import (Interval, PairedDifference, clustered_paired_difference, holm_adjusted,
                                   mean_interval, paired_difference)

COLLAPSED = "collapsed"  # the threshold rule, and the drop's 95% interval below 0
WITHIN_NOISE = "drop within noise"  # the threshold rule, but the drop's interval includes 0
NO_INTERVAL = "collapsed (no interval)"  # the threshold rule; no per-problem records to test it on


def drop_between(final: Optional[EvalCorrect], reference: Optional[EvalCorrect]) -> Optional[PairedDifference]:
    """final − reference accuracy of one run, paired per problem; None unless both evaluations
    were recorded on the same problems."""
    if final is None or reference is None or final.problems != reference.problems \
            or len(final.correct) != len(reference.correct) or not final.correct:
        return None
    return paired_difference(final.correct, reference.correct)


def collapse_verdict(threshold_met: bool, drop: Optional[PairedDifference]) -> str:
    """"" (no collapse), `COLLAPSED`, `WITHIN_NOISE` or `NO_INTERVAL` (see the module docstring)."""
    if not threshold_met:
        return ""
    if drop is None or drop.high is None:
        return NO_INTERVAL
    return COLLAPSED if drop.high < 0 else WITHIN_NOISE


# ---------------------------------------------------------------------------- groups and the baseline


def settings_of(algo: str, overrides: str) -> dict[str, str]:
    """A run's swept settings but the seed: {"algo": algo, key: value, ...} from `algo=.. k=v ..`."""
    settings = {"algo": algo}
    for item in overrides.split():
        key, _, value = item.partition("=")
        if key not in ("seed", "algo"):
            settings[key] = value
    return settings


def choose_baseline(group_settings: list[dict[str, str]], spec: Optional[str]) -> Optional[tuple[str, str]]:
    """(key, value) that names the baseline groups, from `spec` or by default.

    Args:
        group_settings: each group's `settings_of`, in the order of the sweep's jobs.
        spec: "KEY=VALUE" (`report.baseline=trainer.lr=1e-4`), a bare value ("gspo": an algorithm,
            else a value of another swept key), or None: the first job's value of the first swept
            key, `algo` when the algorithms differ (the first value of the sweep's `algo` list).

    Returns:
        None when every group has the same settings (nothing to compare).

    Raises:
        ValueError: `spec` names no group, with the values that exist.
    """
    keys = list(dict.fromkeys(k for s in group_settings for k in s))
    varying = [k for k in keys if len({s.get(k) for s in group_settings}) > 1]
    if spec is None:
        if not varying:
            return None
        key = "algo" if "algo" in varying else varying[0]
        return key, group_settings[0][key]
    if "=" in spec:
        key, _, value = spec.partition("=")
        candidates = [key] if any(s.get(key) == value for s in group_settings) else []
    else:
        value = spec
        candidates = [k for k in keys if any(s.get(k) == value for s in group_settings)]
    if not candidates:
        known = ", ".join(f"{k}={v}" for k in keys for v in dict.fromkeys(s.get(k) for s in group_settings)
                          if v is not None)
        raise ValueError(f"baseline {spec!r} matches no finished group; the groups have {known}")
    key = "algo" if "algo" in candidates else candidates[0]
    return key, value


@dataclass
class Comparison:
    """A group against its baseline at the same other settings."""

    baseline: str
    """Label of the baseline group."""
    seeds: list[int]
    """Seeds both groups finished (the pairs over seeds)."""
    problems: Optional[PairedDifference] = None
    """Paired per (seed, problem) over the seeds with per-problem records on the same problems."""
    over_seeds: Optional[Interval] = None
    """Mean of the per-seed differences of final accuracy, t interval from 2 seeds on."""
    note: str = ""
    """Why a part is missing."""
    p_holm: Optional[float] = None
    """`problems.p` adjusted by Holm's method over every comparison of the report that has one."""


@dataclass
class GroupStats:
    """A group's mean over seeds, and its comparison with the baseline."""

    label: str
    settings: dict[str, str]
    final: Optional[Interval]
    """Final accuracy: mean over the finished seeds, t interval (none at n = 1)."""
    gain: Optional[Interval]
    """Final − step-0 accuracy: mean over seeds, t interval."""
    is_baseline: bool = False
    comparison: Optional[Comparison] = None


def _interval(values: list[Optional[float]]) -> Optional[Interval]:
    known = [v for v in values if v is not None]
    return mean_interval(known) if known else None


def compare(runs: list[Any], base_runs: list[Any], final_correct: dict[str, EvalCorrect], baseline: str) -> Comparison:
    """`runs` (RunSummary) against `base_runs`, paired by seed and, within a seed, by problem.

    Args:
        final_correct: each run's final evaluation, by `RunSummary.job`.
    """
    by_seed = {r.seed: r for r in reversed(runs)}  # the first run of a seed wins
    base_by_seed = {r.seed: r for r in reversed(base_runs)}
    seeds = sorted(set(by_seed) & set(base_by_seed))
    out = Comparison(baseline, seeds)
    if not seeds:
        out.note = "no seed finished in both"
        return out
    a, b, problems, missing = [], [], [], []
    for seed in seeds:
        x, y = final_correct.get(by_seed[seed].job), final_correct.get(base_by_seed[seed].job)
        if x is None or y is None or x.problems != y.problems or len(x.correct) != len(y.correct):
            missing.append(seed)
            continue
        a.extend(x.correct)
        b.extend(y.correct)
        problems.extend((x.problems, i) for i in range(len(x.correct)))  # the same problem on every seed
    if a:
        out.problems = clustered_paired_difference(a, b, problems)
    if missing:
        out.note = (f"seed(s) {', '.join(map(str, missing))} without per-problem records on the same problems: "
                    "left out of the paired test")
    out.over_seeds = _interval([by_seed[s].final_accuracy - base_by_seed[s].final_accuracy for s in seeds])
    return out


def group_stats(groups: dict[str, list[Any]], final_correct: dict[str, EvalCorrect],
                baseline: Optional[str] = None) -> tuple[Optional[str], list[GroupStats]]:
    """Every group's mean with its interval and, where the baseline exists at its other settings,
    its paired comparison with it.

    Args:
        groups: label → finished runs (RunSummary), in job order (`sweep.grouped`).
        final_correct: each run's final evaluation, by job.
        baseline: `choose_baseline`'s spec.

    Returns:
        (the baseline as "KEY=VALUE", or None when all groups share their settings; the stats).
    """
    settings = {label: settings_of(runs[0].algo, runs[0].overrides) for label, runs in groups.items()}
    chosen = choose_baseline(list(settings.values()), baseline) if groups else None
    by_settings = {tuple(sorted(s.items())): label for label, s in settings.items()}
    stats = []
    for label, runs in groups.items():
        gains = [None if r.final_accuracy is None or r.start_accuracy is None else r.final_accuracy - r.start_accuracy
                 for r in runs]
        g = GroupStats(label, settings[label], _interval([r.final_accuracy for r in runs]), _interval(gains))
        if chosen is not None:
            key, value = chosen
            if settings[label].get(key) == value:
                g.is_baseline = True
            else:
                partner = by_settings.get(tuple(sorted({**settings[label], key: value}.items())))
                g.comparison = (compare(runs, groups[partner], final_correct, partner) if partner is not None
                                else Comparison("", [], note=f"no {key}={value} group at these settings"))
        stats.append(g)
    tested = [g.comparison for g in stats if g.comparison and g.comparison.problems and g.comparison.problems.p is not None]
    for comparison, adjusted in zip(tested, holm_adjusted([c.problems.p for c in tested])):
        comparison.p_holm = adjusted
    return (None if chosen is None else f"{chosen[0]}={chosen[1]}"), stats


def group_columns(stats: list[GroupStats], groups: dict[str, list[Any]], baseline: Optional[str]) -> dict[str, dict]:
    """The columns `summary.csv` adds to each finished run from its group: job → {column: value}."""
    out = {}
    for g in stats:
        c = g.comparison
        p = c.problems if c else None
        row = {
            "group": g.label, "group_n": g.final.n if g.final else len(groups[g.label]),
            "group_final_mean": g.final.estimate if g.final else None,
            "group_final_ci_low": g.final.low if g.final else None,
            "group_final_ci_high": g.final.high if g.final else None,
            "baseline": (g.label if g.is_baseline else c.baseline if c else "") if baseline else "",
            "vs_baseline_diff": p.diff if p else None, "vs_baseline_ci_low": p.low if p else None,
            "vs_baseline_ci_high": p.high if p else None, "vs_baseline_p": p.p if p else None,
            "vs_baseline_p_holm": c.p_holm if c else None,
            "vs_baseline_pairs": p.n if p else None, "vs_baseline_problems": p.clusters if p else None,
            "vs_baseline_seeds": len(c.seeds) if c else None,
            "vs_baseline_seed_ci_low": c.over_seeds.low if c and c.over_seeds else None,
            "vs_baseline_seed_ci_high": c.over_seeds.high if c and c.over_seeds else None,
        }
        for run in groups[g.label]:
            out[run.job] = row
    return out


# ---------------------------------------------------------------------------- console


def fmt_interval(value: Optional[Interval | PairedDifference], spec: str = ".3f", signed: bool = False) -> str:
    """"0.412 [0.361, 0.463] n=3", "0.430 n=1" (no interval), or "–"; a difference with its sign."""
    if value is None:
        return "–"
    estimate = value.estimate if isinstance(value, Interval) else value.diff
    text = format(estimate, "+" + spec if signed or isinstance(value, PairedDifference) else spec)
    if value.low is not None:
        text += f" [{value.low:{spec}}, {value.high:{spec}}]"
    return text + f" n={value.n}"


def comparison_table(stats: list[GroupStats], baseline: str):
    """Rich table: each group against the baseline at its other settings."""
    from rich.table import Table

    tested = sum(g.comparison is not None and g.comparison.p_holm is not None for g in stats)
    table = Table(title=f"against the baseline {baseline} at the same other settings: final accuracy "
                        "difference, paired per (seed, problem), interval and p over problems (a problem's "
                        "seeds averaged); 95% intervals; p Holm: p adjusted for the "
                        f"{tested} comparisons (Holm), the one to read when several are made")
    for name in ("group", "baseline", "seeds", "Δ acc [95% CI] pairs / problems", "p", "p Holm",
                 "only this / only baseline right",
                 "Δ over seeds [95% t-CI] n"):
        table.add_column(name, justify="left" if name in ("group", "baseline") else "right")
    for g in stats:
        c = g.comparison
        if c is None:
            continue
        p = c.problems
        table.add_row(g.label, c.baseline or "–", str(len(c.seeds)),
                      fmt_interval(p) + (f" / {p.clusters} problems" if p is not None and p.clusters else ""),
                      "–" if p is None or p.p is None else f"{p.p:.3g}",
                      "–" if c.p_holm is None else f"{c.p_holm:.3g}",
                      "–" if p is None else f"{p.a_only} / {p.b_only}",
                      fmt_interval(c.over_seeds, signed=True) if c.over_seeds and c.over_seeds.n > 1 else
                      ("n=1: no interval" if c.over_seeds else "–"))
    return table


def comparison_notes(stats: list[GroupStats]) -> list[str]:
    """One line per comparison with a part missing, saying why."""
    return [f"{g.label}: {g.comparison.note}" for g in stats if g.comparison and g.comparison.note]


def collapse_line(run: Any) -> Optional[str]:
    """The line a report prints for a run with a collapse verdict (a RunSummary), naming it."""
    if not run.collapse:
        return None
    where = "its start" if run.drop_from_step == 0 and run.best_step != 0 else f"its best (step {run.drop_from_step})"
    ci = "" if run.drop_ci_low is None else f" [95% CI {run.drop_ci_low:+.3f}, {run.drop_ci_high:+.3f}]"
    why = {COLLAPSED: "a drop larger than its interval",
           WITHIN_NOISE: "the interval includes 0: not called a collapse",
           NO_INTERVAL: "no per-problem records (eval_correct.jsonl) to test the drop against its noise"}[run.collapse]
    return (f"{run.collapse}: job {run.job} ({run.overrides}): final accuracy {run.final_accuracy:.3f}, "
            f"{run.drop:+.3f} from {where}{ci}: {why}")
