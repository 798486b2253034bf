"""`make bench`: this project's trainer and TRL's GRPOTrainer (GSPO mode) on one fixed workload.

Runs alternate (gspo, trl, trl, gspo, ...: each pair swaps which goes first, so a drift in
the load of a shared machine hits both alike), each in a fresh process. Reports response
tokens/s, completions/s, the time per phase, peak memory, the per-pair ratio of tokens/s
and the share of the measured dense matmul FLOP/s that the policy update reaches; writes
everything to `bench/results/<date>.json`.

    python -m bench.run [--pairs 5] [--steps 1] [--skip-trl] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from bench.flops import active_params, matmul_shapes, matmul_throughput, step_flops
from bench.workload import Workload, compose_train_config, project_overrides, workload_problems

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
FLOPS_FORMULA = ("update FLOPs = 6 × active params × (prompt + response tokens); whole step = 10 × active params "
                 "× tokens (generation 2, π_old 2, update 6); active params = matmul weights a token passes through "
                 "(attention, router, top-k experts, LM head); attention scores left out")


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def default_results_path(results_dir: Path, day: dt.date) -> Path:
    """`<day>.json`, or `<day>-2.json`, `-3`, ... when that day already has a record: a second
    invocation on one day must not overwrite the first."""
    path, n = results_dir / f"{day.isoformat()}.json", 1
    while path.exists():
        n += 1
        path = results_dir / f"{day.isoformat()}-{n}.json"
    return path


def run_worker(framework: str, workload: Workload, cache_dir: Path, work_dir: Path, index: int) -> dict[str, Any]:
    """Run one measurement in a fresh `python -m bench.worker` process; its log goes to a file."""
    run_dir = work_dir / f"{index:02d}-{framework}"
    run_dir.mkdir(parents=True)
    spec, out, log = run_dir / "spec.json", run_dir / "result.json", run_dir / "worker.log"
    spec.write_text(json.dumps({"workload": workload.to_dict(), "cache_dir": str(cache_dir), "run_dir": str(run_dir)}))
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", framework, str(spec), str(out)],
                              cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"the {framework} run failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return json.loads(out.read_text())


def with_rates(run: dict[str, Any], num_active: int, peak_flops: float) -> dict[str, Any]:
    """Add tokens/s, completions/s, FLOPs and the share of `peak_flops` to a worker's result
    (and tokens/s to its warm-up steps)."""
    flops = step_flops(num_active, run["prompt_tokens"] + run["response_tokens"])
    update_s = run["phases"]["update_s"]
    warmup = run.get("warmup")
    if warmup:
        warmup = {**warmup, "tokens_per_s": warmup["response_tokens"] / warmup["timed_s"]}
    return {
        **run,
        "warmup": warmup,
        "tokens_per_s": run["response_tokens"] / run["timed_s"],
        "completions_per_s": run["completions"] / run["timed_s"],
        "flops": flops,
        "flops_per_s": {"update": flops["update"] / update_s, "step": flops["step"] / run["timed_s"]},
        "utilisation": {"update": flops["update"] / update_s / peak_flops,
                        "step": flops["step"] / run["timed_s"] / peak_flops},
    }


def pair_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gspo tokens/s over trl tokens/s, pair by pair (pairs without a trl run are skipped); with
    warm-up steps also the ratio of the warm-up steps alone (`warmup_ratio`, the cold start)."""
    by_pair: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_pair.setdefault(run["pair"], {})[run["framework"]] = run
    ratios = []
    for i, p in sorted(by_pair.items()):
        if not {"gspo", "trl"} <= p.keys():
            continue
        gspo, trl = p["gspo"], p["trl"]
        ratio = {"pair": i, "gspo_tokens_per_s": gspo["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"],
                 "ratio": gspo["tokens_per_s"] / trl["tokens_per_s"]}
        if gspo.get("warmup") and trl.get("warmup"):
            ratio["warmup_ratio"] = gspo["warmup"]["tokens_per_s"] / trl["warmup"]["tokens_per_s"]
        ratios.append(ratio)
    return ratios


def run_benchmark(workload: Workload, pairs: int, with_trl: bool, cache_dir: Path, work_dir: Path,
                  matmul_seconds: float = 0.5, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure `pairs` alternating gspo/trl runs of `workload`; return the full record."""
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from bench.project import prepare_model_dir
    from gspo_cli.models.loading import count_parameters, load_model, load_tokenizer

    if workload.num_threads > 0:
        torch.set_num_threads(workload.num_threads)  # the matmul reference uses the runs' thread count
    hf_logging.disable_progress_bar()  # "Loading weights" bars would break up the report
    cfg = compose_train_config(project_overrides(workload, cache_dir))
    model_dir = prepare_model_dir(cfg)
    config = AutoConfig.from_pretrained(model_dir)
    num_active, num_total = active_params(config), count_parameters(load_model(model_dir))
    problems = workload_problems(cfg)
    prompt_ids = load_tokenizer(model_dir)([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    seq_len = round(sum(map(len, prompt_ids)) / len(prompt_ids)) + workload.max_new_tokens
    shapes = matmul_shapes(workload.rollout_size, seq_len, config, workload.num_minibatches)
    load_start = os.getloadavg()
    log(f"model {model_dir.name}: {num_total / 1e6:.1f}M parameters, {num_active / 1e6:.2f}M active; "
        f"load average {load_start[0]:.1f}; measuring matmul throughput")
    dtype = torch.bfloat16 if workload.precision == "bf16" else torch.float32  # the dtype the matmuls run in
    matmul_start = matmul_throughput(shapes, matmul_seconds, workload.device, dtype)

    frameworks = ["gspo", "trl"] if with_trl else ["gspo"]
    raw: list[dict[str, Any]] = []
    for pair in range(pairs):
        order = frameworks if pair % 2 == 0 else frameworks[::-1]
        for framework in order:
            run = run_worker(framework, workload, cache_dir, work_dir, len(raw))
            raw.append({"pair": pair, **run})
            log(f"pair {pair + 1}/{pairs} {framework}: {run['response_tokens'] / run['timed_s']:.0f} tokens/s "
                f"({run['timed_s']:.1f}s timed, peak {run['peak_rss_mib']:.0f} MiB)")

    matmul_end = matmul_throughput(shapes, matmul_seconds, workload.device, dtype)
    peak = max(matmul_start["best_flops_per_s"], matmul_end["best_flops_per_s"])
    runs = [with_rates(run, num_active, peak) for run in raw]
    ratios = pair_ratios(runs)
    digests = sorted({run["source_digest"] for run in runs if run["framework"] == "gspo"})
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": matmul_start["num_threads"],
                    "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg())},
        "versions": {"gspo-cli": package_version("gspo-cli"), "git_commit": git_commit(),
                     "trl": package_version("trl"), "torch": torch.__version__,
                     "transformers": package_version("transformers"), "python": platform.python_version(),
                     "gspo_source_digests": digests},
        "source_changed_during_run": len(digests) > 1,
        "workload": workload.to_dict(),
        "eval_during_timed_steps": False,
        "model": {"dir": str(model_dir), "total_params": num_total, "active_params": num_active},
        "flops_formula": FLOPS_FORMULA,
        "matmul": {"start": matmul_start, "end": matmul_end, "best_flops_per_s": peak},
        "runs": runs,
        "pairs": ratios,
        "median_ratio": statistics.median(r["ratio"] for r in ratios) if ratios else None,
        "median_warmup_ratio": (statistics.median(r["warmup_ratio"] for r in ratios)
                                if ratios and all("warmup_ratio" in r for r in ratios) else None),
    }


def results_table(result: dict[str, Any]) -> Table:
    """One row per run: throughput, the time of each phase, utilisation and memory."""
    table = Table(title=f"{result['workload']['model']}: {result['workload']['prompts_per_step']} prompts × "
                        f"{result['workload']['group_size']}, ≤{result['workload']['max_new_tokens']} new tokens, "
                        f"{result['workload']['num_minibatches']} mini-batches, {result['workload']['steps']} timed "
                        f"step(s) after {result['workload']['warmup_steps']} warm-up")
    on_gpu = any("peak_gpu_mib" in run for run in result["runs"])
    for name in ("pair", "trainer", "tokens/s", "compl./s", "generate s", "π_old s", "update s", "reward s",
                 "eval", "step s", "update/peak", "peak MiB", *(["GPU MiB"] if on_gpu else [])):
        table.add_column(name, justify="left" if name == "trainer" else "right")
    for run in result["runs"]:
        p = run["phases"]
        table.add_row(str(run["pair"] + 1), run["framework"], f"{run['tokens_per_s']:.0f}",
                      f"{run['completions_per_s']:.2f}", f"{p['generate_s']:.1f}", f"{p['old_logp_s']:.1f}",
                      f"{p['update_s']:.1f}", f"{p['reward_s']:.2f}", "off", f"{run['timed_s']:.1f}",
                      f"{run['utilisation']['update']:.1%}", f"{run['peak_rss_mib']:.0f}",
                      *([f"{run.get('peak_gpu_mib', 0):.0f}"] if on_gpu else []))
    return table


def print_report(result: dict[str, Any], console: Console) -> None:
    console.print(results_table(result))
    for r in result["pairs"]:
        console.print(f"pair {r['pair'] + 1}: gspo/trl tokens/s = {r['gspo_tokens_per_s']:.0f}/"
                      f"{r['trl_tokens_per_s']:.0f} = {r['ratio']:.2f}×")
    if result["median_ratio"] is not None:
        console.print(f"[bold]median gspo/trl ratio of response tokens/s: {result['median_ratio']:.2f}×[/bold]")
    if result.get("median_warmup_ratio") is not None:
        per_pair = ", ".join(f"{r['warmup_ratio']:.2f}" for r in result["pairs"])
        console.print(f"the warm-up steps alone (each process's first, cold): median ratio "
                      f"{result['median_warmup_ratio']:.2f}× (per pair: {per_pair})")
    m, v = result["machine"], result["versions"]
    if result["source_changed_during_run"]:
        console.print(f"[bold red]gspo_cli changed while the benchmark ran (source digests {v['gspo_source_digests']}):"
                      " its runs measured different code[/bold red]")
    matmul = result["matmul"]
    ref = matmul["start"]
    # Both ends are shown: on a shared machine the clock, and with it the matmul speed, drifts during a run.
    console.print(f"dense matmul reference: {matmul['best_flops_per_s'] / 1e9:.1f} GFLOP/s "
                  f"(best; {ref['best_flops_per_s'] / 1e9:.0f} at the start, {matmul['end']['best_flops_per_s'] / 1e9:.0f} "
                  f"at the end; {ref['dtype']} on {ref['device']}, {m['torch_threads']} CPU threads); "
                  f"{result['flops_formula']}")
    console.print(f"versions: gspo-cli {v['gspo-cli']} (commit {v['git_commit']}, source {','.join(v['gspo_source_digests'])}), trl {v['trl']}, torch {v['torch']}, "
                  f"transformers {v['transformers']}; load average {m['load_avg_start'][0]:.1f} → "
                  f"{m['load_avg_end'][0]:.1f} on {m['cpu_count']} CPUs (shared machine: measured under that load)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Workload()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5,
                        help="gspo/trl pairs (default 5: one pair run in a slow minute moves a median of 3)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed rollout batches per run (default 1)")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="rollout batches before the timed ones, reported apart (default 1)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts_per_step, help="prompts per rollout batch")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="longest response")
    parser.add_argument("--minibatches", type=int, default=defaults.num_minibatches, help="optimizer steps per batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--device", default=defaults.device, help="cpu (default) or cuda: where both trainers run")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=defaults.precision,
                        help="fp32 (default) or bf16 autocast, in both trainers and the matmul reference")
    parser.add_argument("--model", default=defaults.model, help="entry of conf/model/ (default bench-qwen3-moe)")
    parser.add_argument("--model-override", action="append", default=[], help="extra Hydra override, repeatable")
    parser.add_argument("--skip-trl", action="store_true", help="measure this project only")
    parser.add_argument("--matmul-seconds", type=float, default=0.5, help="time per matmul reference shape")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("GSPO_CACHE_DIR", "~/.cache/gspo")).expanduser())
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/<date>.json, <date>-2.json if that exists, ...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workload = Workload(model=args.model, prompts_per_step=args.prompts, group_size=args.group_size,
                        max_new_tokens=args.max_new_tokens, num_minibatches=args.minibatches, steps=args.steps,
                        warmup_steps=args.warmup_steps,
                        num_threads=args.threads, device=args.device, precision=args.precision,
                        model_overrides=tuple(args.model_override))
    with_trl = not args.skip_trl
    if with_trl and package_version("trl") is None:
        sys.exit("TRL is not installed: pip install -e '.[bench]', or pass --skip-trl")
    console = Console() if Console().is_terminal else Console(width=130)  # `make bench | tee` keeps the table whole
    with tempfile.TemporaryDirectory(prefix="gspo-bench-") as work_dir:
        result = run_benchmark(workload, args.pairs, with_trl, args.cache_dir, Path(work_dir),
                               args.matmul_seconds, log=console.print)
    result["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    print_report(result, console)
    out = args.out or default_results_path(RESULTS_DIR, dt.date.today())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
