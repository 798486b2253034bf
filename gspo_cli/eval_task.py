"""Which task, response length and stop strings `gspo eval` scores each checkpoint on, and why.

A checkpoint that is a `gspo train` run (its directory, or a checkpoint inside its `checkpoints/`)
is scored on what that run evaluated on: its task, `trainer.max_new_tokens` and
`trainer.stop_strings`, read from the config the run stored. What the command line sets wins:
`task=NAME` replaces the run's task, `task.KEY=...` changes one key of it. A model that is not a
run (a Hugging Face directory, a hub id) takes the task of the runs listed with it (a base model
beside its fine-tuned run), else the defaults of `conf/eval.yaml`. Checkpoints left on different
settings are an error: a comparison table across tasks means nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from gspo_cli.config import EvalConfig, TaskConfig, TrainerConfig

# The resolved config `gspo train` writes into every run (`launch.write_resolved_config`), then
# Hydra's composed one (runs from before the resolved file existed).
RUN_CONFIGS = ("config.yaml", ".hydra/config.yaml")
COMMAND_LINE, DEFAULTS = "the command line", "the defaults (conf/eval.yaml)"


@dataclass(frozen=True)
class RunSettings:
    """What a `gspo train` run evaluated on, as its stored config says."""

    config: str
    """The file read."""
    task: dict[str, Any]
    """Every `TaskConfig` field."""
    max_new_tokens: int
    """The run's `trainer.max_new_tokens`."""
    stop_strings: list[str]
    """The run's `trainer.stop_strings`."""


@dataclass(frozen=True)
class EvalSettings:
    """What one checkpoint is scored on, and where each part of it came from."""

    task: dict[str, Any]
    """Every `TaskConfig` field."""
    max_new_tokens: int
    stop_strings: list[str]
    origins: dict[str, list[str]] = field(default_factory=dict)
    """Where the settings came from (`the run's config (FILE)`, the command line, the defaults) -> the keys
    taken from there, named as that source names them (`trainer.max_new_tokens` in a run)."""

    def values(self) -> dict[str, Any]:
        """The settings that decide the score, by the key that sets them on the command line."""
        return {**{f"task.{k}": v for k, v in self.task.items()},
                "eval.max_new_tokens": self.max_new_tokens, "eval.stop_strings": list(self.stop_strings)}

    def task_config(self) -> TaskConfig:
        return TaskConfig(**copy.deepcopy(self.task))


# ---------------------------------------------------------------------------- reading a run


def run_config_file(checkpoint: str) -> Optional[Path]:
    """The config a `gspo train` run stored, for its directory or for a checkpoint inside its
    `checkpoints/` (`RUN/checkpoints/final`, `RUN/checkpoints/step_N[/model]`); None otherwise."""
    path = Path(checkpoint).expanduser()
    # only the nearest `checkpoints/`: a model directory that merely sits inside a run stays a model
    inside = next((p.parent for p in path.parents if p.name == "checkpoints"), None)
    for run_dir in (path, inside):
        for name in RUN_CONFIGS if run_dir is not None else ():
            if (run_dir / name).is_file():
                return run_dir / name
    return None


def read_run_settings(checkpoint: str) -> Optional[RunSettings]:
    """The task, response length and stop strings of the run `checkpoint` belongs to, or None."""
    file = run_config_file(checkpoint)
    if file is None:
        return None
    try:  # only what is read is resolved: Hydra's copy may hold interpolations elsewhere
        raw = OmegaConf.load(file)
        if not OmegaConf.is_dict(raw) or "task" not in raw or "trainer" not in raw:
            return None  # some other project's config.yaml
        task = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(TaskConfig),
                                                      OmegaConf.to_container(raw.task, resolve=True)))
        trainer = OmegaConf.to_container(raw.trainer, resolve=True)
    except Exception as exc:  # a run of another version of gspo: say which file, in one line
        raise ValueError(f"cannot read the task of the run from {file}: {str(exc).splitlines()[0]}; "
                         "give the task on the command line (task=NAME task.KEY=...)") from exc
    defaults = TrainerConfig()
    return RunSettings(str(file), task, int(trainer.get("max_new_tokens", defaults.max_new_tokens)),
                       list(trainer.get("stop_strings", defaults.stop_strings)))


# ---------------------------------------------------------------------------- deciding


def given_keys(overrides: Sequence[str]) -> list[str]:
    """The keys a list of Hydra overrides sets: `task=jsonl` -> `task`, `++task.path=a` -> `task.path`."""
    return [o.lstrip("+~").split("=", 1)[0].split("@", 1)[0] for o in overrides]


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def merged_settings(cli: EvalConfig, given: Sequence[str], run: Optional[RunSettings],
                    whose: str = "the run's config") -> EvalSettings:
    """The settings one checkpoint is scored on: the run's, where the command line sets nothing.

    Args:
        cli: The composed `gspo eval` config (defaults and command line together).
        given: The keys set on the command line (`given_keys`).
        run: The run the checkpoint belongs to, or None for any other model.
        whose: How the printed origin names that run.
    """
    cli_task = dataclasses.asdict(cli.task)
    task_keys = [k.removeprefix("task.") for k in given if k.startswith("task.")]
    origins: dict[str, list[str]] = {}

    def took(source: str, key: str) -> None:
        origins.setdefault(source, []).append(key)

    if "task" in given or run is None:  # a task named on the command line is the whole task
        task = cli_task
        took(COMMAND_LINE if "task" in given else DEFAULTS, "task")
    else:
        task = copy.deepcopy(run.task)
        took(f"{whose} ({run.config})", "task")
        for key in task_keys:  # one key of the run's task changed, e.g. task.num_eval=50
            try:
                _set(task, key, copy.deepcopy(_get(cli_task, key)))
            except (KeyError, TypeError):  # `~task.key`: left to Hydra, which has removed it
                continue
    for key in task_keys if "task" not in given else ():
        took(COMMAND_LINE, f"task.{key}")
    values = {}
    for key in ("max_new_tokens", "stop_strings"):
        if f"eval.{key}" in given or run is None:
            values[key] = copy.deepcopy(getattr(cli.eval, key))
            took(COMMAND_LINE if f"eval.{key}" in given else DEFAULTS, f"eval.{key}")
        else:
            values[key] = copy.deepcopy(getattr(run, key))
            took(f"{whose} ({run.config})", f"trainer.{key}")
    return EvalSettings(task, values["max_new_tokens"], list(values["stop_strings"]), origins)


def settings_for(checkpoints: Sequence[str], cli: EvalConfig, given: Sequence[str],
                 runs: Sequence[Optional[RunSettings]]) -> list[EvalSettings]:
    """The settings of every checkpoint (`runs[i]`: the run of `checkpoints[i]`, or None).

    A model that is not a run takes the settings of the runs listed with it. Raises ValueError,
    naming what differs, when the checkpoints would be scored on different settings.
    """
    own = [merged_settings(cli, given, run) if run is not None else None for run in runs]
    raise_on_differences([(c, s) for c, s in zip(checkpoints, own) if s is not None])
    first_run = next((run for run in runs if run is not None), None)
    # e.g. the base model beside its fine-tuned run, scored on the run's task
    plain = merged_settings(cli, given, first_run, "the config of the run listed with it") if first_run else \
        merged_settings(cli, given, None)
    return [s if s is not None else plain for s in own]


def raise_on_differences(labelled: Sequence[tuple[str, EvalSettings]]) -> None:
    """One ValueError line naming each setting on which the checkpoints differ, with its values."""
    if len(labelled) < 2:
        return
    values = [s.values() for _, s in labelled]
    differing = [k for k in values[0] if any(v[k] != values[0][k] for v in values[1:])]
    if not differing:
        return
    listed = "; ".join(f"{key} ({', '.join(f'{shown(v[key])} in {c}' for (c, _), v in zip(labelled, values))})"
                       for key in differing)
    raise ValueError(f"the checkpoints' runs trained on different tasks or settings, and a table comparing scores "
                     f"on different tasks means nothing: {listed}. Evaluate them one at a time, or set these on the "
                     f"command line for all of them (task=NAME and its keys, eval.max_new_tokens=N, ...)")


# ---------------------------------------------------------------------------- saying so


def shown(value: Any) -> str:
    """A value as the command line writes it: true, null, [a,b]."""
    return value if isinstance(value, str) else json.dumps(value)


def task_summary(task: dict[str, Any]) -> str:
    """`task=NAME` and every key that differs from `TaskConfig`'s defaults, e.g.
    `task=jsonl path=a.jsonl chat_template=true`."""
    defaults = dataclasses.asdict(TaskConfig())
    keys = [f"{k}={shown(v)}" for k, v in task.items() if k != "name" and v != defaults.get(k)]
    return " ".join([f"task={task['name']}", *keys])


def describe(checkpoint: str, settings: EvalSettings) -> str:
    """One line: what `checkpoint` is scored on, and where each part came from."""
    what = (f"{task_summary(settings.task)}, eval.max_new_tokens={settings.max_new_tokens}, "
            f"eval.stop_strings={shown(settings.stop_strings)}")
    chosen = [k for k in settings.origins.get(COMMAND_LINE, []) if k.startswith("task.")]
    if "task" in settings.origins.get(DEFAULTS, []) and not chosen:  # nothing chose a task: say the default is one
        return (f"{checkpoint} is not a `gspo train` run and no task was given: evaluating on the default task of "
                f"conf/eval.yaml, {what}; name another with task=NAME")
    sources = "; ".join(f"from {source}: {', '.join(keys)}" for source, keys in settings.origins.items())
    return f"{checkpoint}: {what}; {sources}"
