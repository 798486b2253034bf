"""One sweep run in numbers: the `RunSummary` row of `summary.csv`, made from a run's metric
records and per-problem evaluation records, and the groups of runs (one algorithm at one setting,
its seeds) that the report's tables and figures show. Pure: no files are read here (`sweep` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gspo_cli.report import uncertainty
from gspo_cli.report.eval_records import EvalCorrect
from gspo_cli.report.stats import Interval, mean_interval, wilson_interval

# Accuracy whose first crossing `steps_to_target` reports: on the default configuration the
# warm start is at about 0.45 and 80 steps of GSPO or GRPO reach about 0.78 (README, Measured).
DEFAULT_TARGET = 0.7
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
    final_ci_low: Optional[float] = None
    """95% Wilson score interval of the final accuracy over the held-out problems (needs `eval_correct.jsonl`)."""
    final_ci_high: Optional[float] = None
    eval_problems: Optional[int] = None
    """Held-out problems of the final evaluation (`eval_correct.jsonl`)."""
    best_accuracy: Optional[float] = None
    """Highest `eval/accuracy` of any evaluation."""
    best_step: Optional[int] = None
    """Step of the best evaluation (the first, on ties)."""
    start_accuracy: Optional[float] = None
    """`eval/accuracy` at step 0 (the base the run started from)."""
    collapsed: Optional[bool] = None
    """A finished run that ended more than `COLLAPSE_DROP` below its best evaluation, or more than
    5 points below its start (it learned and then lost it, or only lost), by a drop larger than its
    95% interval when per-problem records exist: `collapse` is then "collapsed" (or
    "collapsed (no interval)" without them)."""
    collapse: str = ""
    """The verdict: "", "collapsed", "drop within noise" (the rule met, its interval includes 0),
    "collapsed (no interval)"."""
    drop: Optional[float] = None
    """Final accuracy − that of `drop_from_step` (the best evaluation; step 0 when only the start rule applies)."""
    drop_ci_low: Optional[float] = None
    """95% paired t interval of `drop` over the held-out problems (needs `eval_correct.jsonl`)."""
    drop_ci_high: Optional[float] = None
    drop_from_step: Optional[int] = None
    mean_clip_fraction: Optional[float] = None
    """`clip/fraction` (a share of response tokens) averaged over the training steps."""
    mean_clip_fraction_nonzero_adv: Optional[float] = None
    """`clip/fraction_nonzero_adv` (a share of the tokens with a non-zero advantage) averaged over the steps."""
    mean_uniform_groups: Optional[float] = None
    """`reward/uniform_groups` (share of groups whose rewards were all equal) averaged over the steps."""
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


def summarize_records(records: list[dict], max_steps: int, target: float,
                      correct: Optional[dict[int, EvalCorrect]] = None) -> dict[str, Any]:
    """Accuracy, clipping and progress figures of one run's `metrics.jsonl` records, with
    intervals from its per-problem records (`correct`, by step; `eval_correct.jsonl`).

    A run has finished when its last record is the final evaluation at `max_steps`.
    """
    accuracy = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    last = records[-1] if records else {}
    finished = last.get("step") == max_steps and "eval/accuracy" in last
    best = max(accuracy, key=lambda p: p[1], default=(None, None))  # max keeps the first of ties
    start = accuracy[0][1] if accuracy and accuracy[0][0] == 0 else None
    final = last["eval/accuracy"] if finished else None
    correct = correct or {}
    figures: dict[str, Any] = {"collapsed": None}
    if final is not None:
        from_best = final < best[1] - COLLAPSE_DROP
        from_start = start is not None and final < start - 0.05
        ref_step = 0 if from_start and not from_best else best[0]
        ref_accuracy = start if ref_step == 0 and start is not None else best[1]
        drop = uncertainty.drop_between(correct.get(last["step"]), correct.get(ref_step))
        verdict = uncertainty.collapse_verdict(from_best or from_start, drop)
        figures = {"collapsed": verdict in (uncertainty.COLLAPSED, uncertainty.NO_INTERVAL), "collapse": verdict,
                   "drop": final - ref_accuracy, "drop_from_step": ref_step,
                   "drop_ci_low": drop.low if drop else None, "drop_ci_high": drop.high if drop else None}
        if last["step"] in correct and correct[last["step"]].correct:
            outcomes = correct[last["step"]].correct
            wilson = wilson_interval(sum(outcomes), len(outcomes))
            figures.update(final_ci_low=wilson.low, final_ci_high=wilson.high, eval_problems=len(outcomes))
    return {
        **figures,
        "finished": finished,
        "final_accuracy": final,
        "best_accuracy": best[1],
        "best_step": best[0],
        "start_accuracy": start,
        "mean_clip_fraction": _mean_of(records, "clip/fraction"),
        "mean_clip_fraction_nonzero_adv": _mean_of(records, "clip/fraction_nonzero_adv"),
        "mean_uniform_groups": _mean_of(records, "reward/uniform_groups"),
        "mean_volatility": _mean_of(records, VOLATILITY_METRIC),
        "mean_response_length": _mean_of(records, "response_length/mean"),
        "steps_to_target": steps_to_target(accuracy, target),
        "last_step": last.get("step"),
    }


def _mean_of(records: list[dict], name: str) -> Optional[float]:
    values = [r[name] for r in records if name in r]
    return sum(values) / len(values) if values else None


def job_label(summary: RunSummary) -> str:
    """Plot and table group of a run: its algorithm plus any swept override but the seed."""
    return " ".join([summary.algo or "?", other_overrides(summary.overrides)]).strip()


def other_overrides(overrides: str) -> str:
    return " ".join(o for o in overrides.split() if not o.startswith(("seed=", "algo=")))


def by_setting(groups: dict[str, list[RunSummary]]) -> dict[str, list[tuple[str, dict[str, Optional[Interval]]]]]:
    """Per algorithm, its groups' means over seeds with their t intervals (none at n = 1) at each
    other swept setting (e.g. a response length), in the order the settings first appear: what
    `plot_by_setting` draws."""
    series: dict[str, list[tuple[str, dict[str, Optional[Interval]]]]] = {}
    for runs in groups.values():
        first = runs[0]
        gains = [None if r.final_accuracy is None or r.start_accuracy is None else r.final_accuracy - r.start_accuracy
                 for r in runs]
        series.setdefault(first.algo, []).append((other_overrides(first.overrides), {
            "final eval/accuracy": _interval([r.final_accuracy for r in runs]),
            # each setting has a base of its own (a warm start per response length): the gain compares them
            "eval/accuracy gained (final - step 0)": _interval(gains),
            "clip/fraction": _interval([r.mean_clip_fraction for r in runs]),
            "response_length/mean": _interval([r.mean_response_length for r in runs]),
        }))
    return series


def _interval(values: list[Optional[float]]) -> Optional[Interval]:
    known = [v for v in values if v is not None]
    return mean_interval(known) if known else None


def grouped(summaries: list[RunSummary]) -> dict[str, list[RunSummary]]:
    """Finished runs by `job_label`, in order of first appearance."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        if s.status == "finished":
            groups.setdefault(job_label(s), []).append(s)
    return groups
