"""One measured run in a process of its own: `python -m bench.worker FRAMEWORK SPEC_JSON OUT_JSON`.

A fresh process per run keeps the runs independent (no warm allocator, no imported state
carried from the other trainer) and makes the peak resident memory its own.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from bench.workload import Workload, compose_train_config, project_overrides, workload_problems


def source_digest() -> str:
    """A short hash of the project's source files as this run imported them.

    The git commit does not see uncommitted edits; this does, so a result that mixes runs of
    different code (someone editing the trainer while the benchmark runs) is flagged.
    """
    import hashlib

    import gspo_cli

    digest = hashlib.sha256()
    for path in sorted(Path(gspo_cli.__file__).parent.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(framework: str, workload: Workload, cache_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Run `workload` once with `framework` ("gspo" or "trl"); timings, token counts and memory."""
    from bench.project import prepare_model_dir, run_project
    from gspo_cli.models.loading import load_tokenizer

    cfg = compose_train_config(project_overrides(workload, cache_dir))
    model_dir = prepare_model_dir(cfg)
    problems = workload_problems(cfg)
    tokenizer = load_tokenizer(model_dir)
    timed = problems[workload.warmup_steps * workload.prompts_per_step:]  # the prompts of the timed steps
    prompt_tokens = sum(len(ids) for ids in tokenizer([p.prompt for p in timed], add_special_tokens=False)["input_ids"])
    baseline = peak_rss_mib()  # interpreter and libraries, before any model is loaded
    if framework == "gspo":
        result = run_project(cfg, run_dir, prompt_tokens * workload.group_size, workload.warmup_steps)
    elif framework == "trl":
        from bench.trl_grpo import run_trl

        result = run_trl(workload, cfg, model_dir, problems, run_dir)
    else:
        raise ValueError(f"framework={framework!r} is not one of ['gspo', 'trl']")
    gpu = {}
    if workload.device.startswith("cuda"):
        import torch

        gpu["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {**result, "source_digest": source_digest(), "baseline_rss_mib": baseline, "peak_rss_mib": peak_rss_mib(),
            **gpu}


def main(argv: list[str]) -> None:
    framework, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = run_one(framework, Workload.from_dict(spec["workload"]), Path(spec["cache_dir"]), Path(spec["run_dir"]))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
