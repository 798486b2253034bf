"""Compare what two runs logged (`metrics.jsonl` records): exactly where the two runs are the
same computation, within a stated relative tolerance where they compute the same numbers by
different code paths (docs/testing.md, "Exact float equality only by construction")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Logged figures of the machine, not of the run: they differ between any two runs.
MACHINE_FIGURES = ("time/", "memory/", "throughput/")


def read_records(run_dir: Path, leave_out: tuple[str, ...] = MACHINE_FIGURES) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`, one per logged step, without the metrics whose
    names start with one of `leave_out`."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(leave_out)} for r in records]


def assert_records_close(got: list[dict], expected: list[dict], rel: float, abs: float = 0.0) -> None:
    """Assert that two runs logged the same steps with the same metric names, each float within
    `rel` of the expected value's magnitude or within `abs` (for figures near 0 that are
    themselves rounding noise), and every other value (step numbers, strings) equal.

    Every metric outside the tolerance is named in the failure, with both values and the step.
    """
    assert [sorted(r) for r in got] == [sorted(r) for r in expected], "other steps or metric names"
    differences = []
    for step, (have, want) in enumerate(zip(got, expected)):
        for name, value in want.items():
            if isinstance(value, float) or isinstance(have[name], float):
                same = have[name] == pytest.approx(value, rel=rel, abs=abs)
            else:
                same = have[name] == value
            if not same:
                differences.append(f"record {step} {name}: {have[name]!r} against {value!r}")
    assert not differences, f"{len(differences)} figures differ by more than rel={rel}, abs={abs}:\n" + "\n".join(
        differences)
