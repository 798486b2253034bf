"""Metrics logging: `metrics.jsonl`, Weights & Biases and the console, behind one object.

`metrics.jsonl` in the run directory is the record of truth: it is written first, flushed
line by line, and never depends on W&B. W&B is best effort: any failure turns it off for
the rest of the run with one warning, so a missing login or network never stops training.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from gspo_cli.config import LoggerConfig
from gspo_cli.report.eval_records import EVAL_CORRECT_FILE, eval_correct_line

# Bounds (seconds) on how long W&B may block the trainer. wandb's defaults are 90 s for
# init and *unbounded* for finish, which could hang a run at its very end on a bad network;
# the login bound makes an unattended API-key prompt give up instead of waiting forever.
WANDB_TIMEOUTS = {"init_timeout": 60.0, "finish_timeout": 120.0, "login_timeout": 30.0}


def default_netrc_path(env: Mapping[str, str]) -> Path:
    """Return the netrc file wandb itself would read: `$NETRC`, else `~/.netrc` or `~/_netrc`."""
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    home, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if not home.exists() and windows.exists() else home


def resolve_wandb_mode(cfg_mode: Optional[str], env: Mapping[str, str],
                       netrc_path: Optional[str | Path]) -> str:
    """Choose the W&B mode: config, then `WANDB_MODE`, then online only if logged in.

    Defaulting to offline when there are no credentials keeps `wandb.init` from prompting
    for an API key (or failing) on machines that were never set up for W&B.

    Args:
        cfg_mode: `LoggerConfig.mode`; wins when set.
        env: Environment variables (`WANDB_MODE`, `WANDB_API_KEY`, `WANDB_BASE_URL`).
        netrc_path: netrc file to look for a W&B machine entry in; None skips the check.

    Returns:
        "online", "offline", "disabled" or another mode wandb accepts, lower-cased.
    """
    if cfg_mode:
        return cfg_mode.strip().lower()
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"].strip().lower()
    if env.get("WANDB_API_KEY"):
        return "online"
    if netrc_path is not None:
        host = urlsplit(env.get("WANDB_BASE_URL", "")).netloc or "api.wandb.ai"
        try:
            if netrc.netrc(str(netrc_path)).authenticators(host):
                return "online"
        except (OSError, netrc.NetrcParseError):
            pass  # no file or an unreadable one: not logged in
    return "offline"


def drop_records_from(path: Path, step: int) -> int:
    """Remove the JSON lines whose "step" is `step` or later (and a torn last line); returns
    how many lines went. Step 0 empties the file: a fresh run in a used directory (resume
    found no checkpoint, or a fixed `hydra.run.dir`) must not append to an earlier run's log."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) < step:
                kept.append(line + "\n")
    if len(kept) < len(lines):
        path.write_text("".join(kept))
    return len(lines) - len(kept)


class RunLogger:
    """Send each step's metrics to `metrics.jsonl`, W&B and the console.

    `step` counts completed RL steps: 0 is the evaluation before training and
    `total_steps` the last step. Use it as a context manager, or call `close()`.
    W&B drops rows whose step is lower than one already logged, so log in step order.
    """

    def __init__(self, run_dir: str | Path, logger_cfg: LoggerConfig, config: dict,
                 run_name: str, total_steps: int, enabled: bool = True,
                 key_metrics: Sequence[str] = ("reward/mean", "clip/fraction", "eval/accuracy"),
                 job_type: Optional[str] = None, resume_id: Optional[str] = None, start_step: int = 0,
                 ) -> None:
        """Open the log files, start W&B if configured and start the console display.

        Args:
            run_dir: Directory of the run; created if missing. W&B files go below it.
            logger_cfg: W&B and console settings.
            config: The resolved run configuration, stored with the W&B run.
            run_name: Name of the run on W&B and on the progress bar.
            total_steps: Number of RL steps, for the progress bar and the ETA.
            enabled: False on non-zero distributed ranks: then every method does nothing.
            key_metrics: Metrics shown on the console (last logged value of each).
            job_type: W&B job type ("eval" for `gspo eval`); None leaves W&B's default.
            resume_id: W&B run id to continue (a resumed run); None starts a new run.
            start_step: First step this process logs; records of later steps left by an
                interrupted process are dropped from the local logs, so that they read as
                one uninterrupted run. 0 (a fresh run) drops every record found there.
        """
        self.enabled = enabled
        self.wandb_run: Any = None
        self.wandb_dir: Optional[Path] = None
        self._progress: Optional[Progress] = None
        self._exit_code = 0
        self._closed = not enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.total_steps, self.key_metrics = logger_cfg, total_steps, tuple(key_metrics)
        self.job_type = job_type
        self._latest: dict[str, float] = {}
        self._started = time.monotonic()
        self._first: Optional[tuple[int, float]] = None  # (step, time) of the first log
        dropped = sum(drop_records_from(self.run_dir / name, start_step)
                      for name in ("metrics.jsonl", "samples.jsonl", EVAL_CORRECT_FILE))
        # Line-buffered: each line reaches the OS whole, so a killed run leaves complete lines.
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._samples_file = None  # opened on first use: most runs log few samples
        if logger_cfg.wandb:
            self._init_wandb(config, run_name, resume_id)
        # W&B is set up first so that its own start-up messages print before the bar.
        if Console().is_terminal:
            # Metrics take the remaining width and are cut with an ellipsis: otherwise rich
            # shrinks the bar and the times away on an 80-column terminal.
            metrics_col = Column(no_wrap=True, overflow="ellipsis", ratio=1)
            self._progress = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("steps"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}", markup=False, table_column=metrics_col),
                expand=True, refresh_per_second=2,  # a step takes seconds: no need for more
            )
            self._task = self._progress.add_task(run_name, total=total_steps, metrics="")
            self._progress.start()
        if dropped:
            kind = "an earlier run" if start_step == 0 else f"steps from {start_step} on (resumed)"
            self._emit(f"{self.run_dir}: {dropped} logged records of {kind} removed from "
                       f"metrics.jsonl/samples.jsonl/{EVAL_CORRECT_FILE}")

    @property
    def wandb_id(self) -> Optional[str]:
        """Id of the W&B run (saved in checkpoints so a resumed run continues it)."""
        return None if self.wandb_run is None else self.wandb_run.id

    def _init_wandb(self, config: dict, run_name: str, resume_id: Optional[str] = None) -> None:
        mode = resolve_wandb_mode(self.cfg.mode, os.environ, default_netrc_path(os.environ))
        if mode == "disabled":
            return  # no dummy run object: `wandb_run is None` then means "no W&B" everywhere
        try:
            import wandb  # imported only when used: it is slow to import and logger=none needs none of it

            self.wandb_run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group,
                name=run_name, job_type=self.job_type, tags=list(self.cfg.tags) or None, config=config,
                dir=str(self.run_dir), mode=mode, settings=wandb.Settings(**WANDB_TIMEOUTS),
                id=resume_id, resume="allow" if resume_id else None,
            )
            # `<sync dir>/files`; the run's `run-<id>.wandb` log lies in its parent.
            self.wandb_dir = Path(self.wandb_run.dir)
        except Exception as exc:  # wandb raises many types; none may stop training
            self._wandb_failed(exc)

    def _wandb_failed(self, exc: BaseException) -> None:
        """Warn once and continue without W&B for the rest of the run."""
        run, self.wandb_run = self.wandb_run, None
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        self._emit(f"W&B unavailable ({reason}); continuing with metrics.jsonl only")
        if run is not None:  # already broken: what matters is that we stop calling it
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record the metrics of one step (call once per step with all of them).

        Args:
            metrics: Metric name to value; values are converted with `float()`.
            step: Completed RL steps (0 = before training).
        """
        if self._closed:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._metrics_file.write(json.dumps({"step": int(step), **values}) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(values, step=int(step))
            except Exception as exc:
                self._wandb_failed(exc)
        self._update_console(step, values)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Record example completions: `samples.jsonl` and a W&B table under "samples".

        Args:
            step: Step the samples belong to; not lower than the last `log` step, or W&B
                drops the table (`samples.jsonl` keeps it either way).
            rows: One dict per sample, e.g. prompt, completion, answer, reward.
        """
        if self._closed or not rows:
            return
        if self._samples_file is None:
            self._samples_file = open(self.run_dir / "samples.jsonl", "a", buffering=1)
        for row in rows:
            self._samples_file.write(json.dumps({"step": int(step), **row}, default=str) + "\n")
        if self.wandb_run is not None:
            # Union of the keys, in first-seen order, so uneven rows still fit one table.
            columns = list(dict.fromkeys(k for row in rows for k in row))
            try:
                import wandb

                table = wandb.Table(columns, [[r.get(c) for c in columns] for r in rows])
                self.wandb_run.log({"samples": table}, step=int(step))
            except Exception as exc:
                self._wandb_failed(exc)

    def log_eval_correct(self, step: int, problems: str, correct: Sequence[bool | int]) -> None:
        """Record which held-out problems one evaluation answered correctly (`eval_correct.jsonl`,
        see `report.eval_records`): `correct[i]` for problem i, `problems` their digest."""
        if self._closed:
            return
        with open(self.run_dir / EVAL_CORRECT_FILE, "a") as f:  # one line per evaluation: rare, opened each time
            f.write(eval_correct_line(step, problems, correct))

    def print(self, message: str) -> None:
        """Print a message above the progress bar (or plainly when there is none)."""
        if not self._closed:
            self._emit(message)

    def _emit(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)  # plain print: rich would wrap long lines at 80 columns

    def _update_console(self, step: int, values: dict[str, float]) -> None:
        latest = self._latest  # last value of each key metric: eval/* only comes now and then
        latest.update({k: v for k, v in values.items() if k in self.key_metrics})
        shown = " | ".join(f"{k} {latest[k]:.4g}" for k in self.key_metrics if k in latest)
        now, first = time.monotonic(), self._first is None
        self._first = self._first or (step, now)
        if self._progress is not None:
            self._progress.update(self._task, completed=min(step, self.total_steps), metrics=shown)
            return
        every = max(1, self.cfg.console_every)
        is_eval = any(k.startswith("eval/") for k in values)
        if not (first or step % every == 0 or step >= self.total_steps or is_eval):
            return
        # Average over the steps since the first log; at the first log, since construction.
        first_step, first_time = self._first
        done, since = (step - first_step, first_time) if not first else (step, self._started)
        rate = f" | {(now - since) / done:.1f} s/step" if done > 0 else ""
        parts = [f"step {step}/{self.total_steps}"] + ([shown] if shown else [])
        self._emit(" | ".join(parts) + rate)

    def close(self) -> None:
        """Stop the display, finish W&B and close the files. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            try:  # offline runs: wandb itself prints the `wandb sync` command here
                run.finish(exit_code=self._exit_code)
            except Exception as exc:
                print(f"W&B finish failed ({type(exc).__name__}: {exc}); metrics.jsonl is complete")
        self._metrics_file.close()
        if self._samples_file is not None:
            self._samples_file.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type: Optional[type], *_: object) -> None:
        # An exception out of the training loop marks the W&B run as failed, not finished.
        self._exit_code = 0 if exc_type is None else 1
        self.close()
