"""`gspo` command line: `gspo train | sweep | eval | export | report | plot`.

`gspo train|eval ARGS` hands ARGS to a Hydra application composed from `conf/<command>.yaml`,
so every Hydra flag works (`--cfg job`, `--help`, `-m`, `hydra.run.dir=...`). `gspo sweep`
is `gspo train --multirun` with the grid of `conf/sweep/<name>.yaml`, then `gspo report`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gspo_cli.config import EvalConfig, TrainConfig, register_configs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
USAGE = """usage: gspo <command> [hydra overrides]

commands:
  train    RL training (GSPO, GRPO, ...): gspo train algo=grpo trainer.max_steps=100
  sweep    grid of training runs + report: gspo sweep algo=gspo,grpo seed=0,1 [--target 0.7]
  report   summary.csv, tables, plots, intervals: gspo report outputs/sweeps/NAME [--baseline gspo]
  eval     greedy, mean@k, pass@k, maj@k:  gspo eval checkpoint=[outputs/A,outputs/B] eval.k=8
  export   LoRA adapters merged into a HF model: gspo export outputs/A --out merged/
  plot     curves of finished runs:       gspo plot outputs/A outputs/B --out curves.png
  ls       config groups and options:     gspo ls [algo]
  help     this message

Config groups and their options: gspo train --help
"""


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_app(cfg: DictConfig) -> float:
    """Hydra entry point of `gspo train`; returns the final accuracy (for sweepers)."""
    from gspo_cli.launch import run
    from gspo_cli.report.sweep import record_job

    typed: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # job.json (record_job): how `gspo report` tells a failed job from a running one
    with user_errors_in_one_line(), record_job(run_dir):
        record = run(typed, run_dir)  # in this process, or under torchrun for several
    return float(record.get("eval/accuracy", 0.0))


@contextlib.contextmanager
def user_errors_in_one_line():
    """Errors in what the user gave (config values, paths, files, imports) end the run with one
    line and exit status 1; the traceback only with HYDRA_FULL_ERROR=1, as Hydra does."""
    from gspo_cli.train.guards import TrainingDiverged

    try:
        yield
    except (ValueError, FileNotFoundError, ImportError, OSError, TrainingDiverged) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"gspo: error: {exc}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def eval_app(cfg: DictConfig) -> None:
    """Hydra entry point of `gspo eval`."""
    from gspo_cli.evaluate import run_eval

    if OmegaConf.is_missing(cfg, "checkpoint"):
        print("gspo eval: set checkpoint=<dir> (a model directory, a `gspo train` run directory, "
              "or several as checkpoint=[dir1,dir2])", file=sys.stderr)
        sys.exit(2)
    typed: EvalConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    hydra_cfg = HydraConfig.get()
    with user_errors_in_one_line():  # what the command line set wins over a run's own task
        run_eval(typed, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))


INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--version")


def sweep_arguments(args: list[str], now: str) -> tuple[list[str], str, float, bool]:
    """Turn `gspo sweep` arguments into `gspo train --multirun` ones.

    Adds the sweep config (`+sweep=default` unless `sweep=NAME` is given), a sweep
    directory `outputs/sweeps/<name>-<now>` unless `hydra.sweep.dir` is given, and
    `logger.group=<sweep directory name>` so all jobs share one W&B group.

    Returns:
        (Hydra arguments, sweep directory, report target accuracy, whether to report).
    """
    from gspo_cli.report.sweep import DEFAULT_TARGET

    target, rest, i = DEFAULT_TARGET, [], 0
    while i < len(args):  # `--target X` / `--target=X` is ours, not Hydra's
        if args[i].startswith("--target="):
            target = float(args[i].split("=", 1)[1])
        elif args[i] == "--target" and i + 1 < len(args):
            target, i = float(args[i + 1]), i + 1
        else:
            rest.append(args[i])
        i += 1
    name = "default"
    for j, arg in enumerate(rest):
        if arg.lstrip("+").startswith("sweep="):
            name = arg.split("=", 1)[1]
            rest[j] = f"+sweep={name}"
    # Added after the user's arguments: Hydra's parser wants its flags (`--cfg job`) before the overrides.
    if not any(a.lstrip("+").startswith("sweep=") for a in rest):
        rest.append(f"+sweep={name}")
    sweep_dir = next((a.split("=", 1)[1] for a in rest if a.startswith("hydra.sweep.dir=")), None)
    if sweep_dir is None:
        sweep_dir = f"outputs/sweeps/{name}-{now}"
        rest.append(f"hydra.sweep.dir={sweep_dir}")
    if not any(a.startswith("logger.group=") for a in rest):
        rest.append(f"logger.group={Path(sweep_dir).name}")
    report = not any(a.split("=")[0] in INFO_FLAGS for a in rest)  # no jobs run with `--cfg` or `--help`
    return ["--multirun", *rest] if report else rest, sweep_dir, target, report


def pop_baseline(args: list[str]) -> tuple[Optional[str], list[str]]:
    """`report.baseline=X`, `--baseline X` or `--baseline=X` taken out of `args`: (X or None, the rest).

    X names the groups the report compares every other group with: an algorithm (`gspo`), or
    `KEY=VALUE` of another swept key; by default the first swept value.
    """
    baseline, rest, i = None, [], 0
    while i < len(args):
        if args[i].startswith(("report.baseline=", "--baseline=")):
            baseline = args[i].split("=", 1)[1]
        elif args[i] == "--baseline" and i + 1 < len(args):
            baseline, i = args[i + 1], i + 1
        else:
            rest.append(args[i])
        i += 1
    return baseline, rest


def sweep_command(args: list[str]) -> None:
    """`gspo sweep [overrides] [--target ACC] [report.baseline=X]`: a Hydra multirun of `gspo train`,
    then its report.

    The report is written after the jobs end, also when a job failed or the sweep was
    interrupted (then it names the jobs that did not finish), and before the error is passed on.
    """
    import time

    from gspo_cli.report.sweep import build_report

    baseline, args = pop_baseline(args)
    hydra_args, sweep_dir, target, report = sweep_arguments(args, time.strftime("%Y-%m-%d_%H-%M-%S"))
    register_configs()
    sys.argv = ["gspo sweep", *hydra_args]
    try:
        train_app()
    finally:
        if report and any(Path(sweep_dir).glob("*/.hydra/config.yaml")):
            try:
                build_report(sweep_dir, target, baseline=baseline)
            except Exception as exc:  # never hide the sweep's own error behind the report's
                print(f"gspo sweep: the report failed ({type(exc).__name__}: {exc}); "
                      f"retry with `gspo report {sweep_dir}`", file=sys.stderr)


def report_command(args: list[str]) -> None:
    """`gspo report SWEEP_DIR [--target ACC] [--baseline X | report.baseline=X]`: summary.csv, tables
    and plots from the runs' files, with intervals and paired comparisons against the baseline."""
    import argparse

    from gspo_cli.report.sweep import DEFAULT_TARGET, build_report

    parser = argparse.ArgumentParser(prog="gspo report", description=report_command.__doc__)
    parser.add_argument("sweep_dir", help="directory of a `gspo sweep` (holds one directory per job)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET,
                        help=f"accuracy for the steps-to-target column (default {DEFAULT_TARGET})")
    parser.add_argument("--baseline", default=None,
                        help="the groups every other is compared with: an algorithm (gspo) or KEY=VALUE of a swept "
                             "key; also report.baseline=X (default: the first swept value)")
    baseline, args = pop_baseline(args)
    opts = parser.parse_args(args)
    try:
        build_report(opts.sweep_dir, opts.target, baseline=baseline or opts.baseline)
    except (FileNotFoundError, ValueError) as exc:
        print(f"gspo report: {exc}", file=sys.stderr)
        sys.exit(2)


def plot_command(args: list[str]) -> None:
    """`gspo plot RUN_DIR... [--out FILE.png]`: training curves of runs side by side."""
    import argparse

    from gspo_cli.report.plots import plot_runs

    parser = argparse.ArgumentParser(prog="gspo plot", description=plot_command.__doc__)
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    parser.add_argument("--metrics", default="reward/mean,clip/fraction,eval/accuracy",
                        help="comma-separated metric names, one panel each")
    opts = parser.parse_args(args)
    print(plot_runs(opts.run_dirs, opts.out, tuple(opts.metrics.split(","))))


def adapters_of(path: Path) -> Path:
    """The adapter directory a path names: a run's `checkpoints/final/`, a checkpoint's `model/`, or itself."""
    for candidate in (path / "checkpoints" / "final", path / "model", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no LoRA adapters (adapter_config.json): export merges the adapters "
                            "of a run trained with model.lora.rank > 0; a full fine-tune's checkpoints/final/ "
                            "is already a Hugging Face model")


def export_command(args: list[str]) -> None:
    """`gspo export PATH [--out DIR]`: merge a LoRA run's adapters into its base model and write an
    ordinary Hugging Face model that `from_pretrained` loads (PATH: a run directory, its
    `checkpoints/final/`, or a `checkpoints/step_N/`)."""
    import argparse

    from gspo_cli.models.lora import merge_into_base

    parser = argparse.ArgumentParser(prog="gspo export", description=export_command.__doc__)
    parser.add_argument("path", help="run directory, checkpoints/final/ or checkpoints/step_N/ (checkpoint=PATH works too)")
    parser.add_argument("--out", help="directory to write (default: the run's checkpoints/merged/, else PATH-merged)")
    parser.add_argument("--merge", action="store_true", help="accepted for clarity: export always merges")
    opts = parser.parse_args(args)
    path = Path(opts.path.removeprefix("checkpoint="))
    try:
        adapters = adapters_of(path)
    except FileNotFoundError as exc:
        print(f"gspo export: {exc}", file=sys.stderr)
        sys.exit(2)
    default = path / "checkpoints" / "merged" if (path / "checkpoints").is_dir() else Path(f"{adapters}-merged")
    print(f"wrote {merge_into_base(adapters, opts.out or default)}")


def config_menu(conf_dir: Path = CONF_DIR) -> dict[str, list[tuple[str, str]]]:
    """Every config group with its options and the first comment line of each option's file."""
    menu = {}
    for group in sorted(p for p in conf_dir.iterdir() if p.is_dir()):
        options = []
        for path in sorted(group.glob("*.yaml")):
            comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines()
                        if line.startswith("#") and not line.startswith("# @package")]
            options.append((path.stem, comments[0] if comments else ""))
        menu[group.name] = options
    return menu


def ls_command(args: list[str]) -> None:
    """`gspo ls [GROUP]`: the config groups, their options and what each one is."""
    from rich.console import Console
    from rich.table import Table

    menu = config_menu()
    unknown = [g for g in args if g not in menu]
    if unknown:
        print(f"gspo ls: no config group {unknown[0]!r}; the groups are {', '.join(menu)}", file=sys.stderr)
        sys.exit(2)
    table = Table("group", "option", "what it is", show_lines=False)
    for group, options in menu.items():
        if args and group not in args:
            continue
        for i, (option, description) in enumerate(options):
            table.add_row(group if i == 0 else "", option, description)
    Console().print(table)


def unknown_key_message(args: list[str], schema: type = TrainConfig, conf_dir: Path = CONF_DIR) -> str | None:
    """A message naming the valid keys (and the closest one) for an override of a key the schema lacks.

    Hydra refuses such overrides too, but names only the bad key; this names the choices.
    Group selections (`algo=grpo`), `+`/`~` overrides, Hydra's own keys and flags are left to Hydra.
    """
    import dataclasses
    import difflib
    import typing

    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")) or key in groups:
            continue
        node: Any = schema
        parts = key.split(".")
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(node)
            if part not in hints:
                where = ".".join(parts[:i]) or "the config"
                close = difflib.get_close_matches(part, list(hints), n=1)
                hint = f"; did you mean {'.'.join(parts[:i] + close)}?" if close else ""
                return f"unknown key {key!r}{hint} Keys of {where}: {', '.join(sorted(hints))}"
            inner = [t for t in (typing.get_args(hints[part]) or (hints[part],)) if dataclasses.is_dataclass(t)]
            if not inner:  # a value (or a free-form dict such as algo.params): nothing below to check
                break
            node = inner[0]
    return None


HYDRA_COMMANDS = {"train": train_app, "eval": eval_app}
PLAIN_COMMANDS = {"plot": plot_command, "sweep": sweep_command, "report": report_command, "ls": ls_command,
                  "export": export_command}


def main(argv: list[str] | None = None) -> None:
    """Dispatch `gspo <command>` to its Hydra application."""
    argv = sys.argv[1:] if argv is None else argv
    command, args = (argv[0], argv[1:]) if argv else ("help", [])
    if command in PLAIN_COMMANDS:
        PLAIN_COMMANDS[command](args)
    elif command in HYDRA_COMMANDS:
        message = unknown_key_message(args) if command == "train" else None
        if message:
            print(f"gspo {command}: {message}", file=sys.stderr)
            sys.exit(1)
        register_configs()
        sys.argv = [f"gspo {command}", *args]  # Hydra parses sys.argv
        HYDRA_COMMANDS[command]()
    elif command in ("help", "-h", "--help"):
        print(USAGE)
    else:
        print(f"gspo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
