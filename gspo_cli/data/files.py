"""Reading prompt sets with the `datasets` library: from disk, or from the Hugging Face hub.

Accepts a JSON-lines or JSON file, a Parquet file, a directory written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`, and, through `datasets.load_dataset`,
a hub id such as `openai/gsm8k` or a data set repository on disk (any other directory: its
splits named by its files, e.g. `main/train-00000-of-00001.parquet`, or by its README's
`configs`). Every error names the file and, where one is at fault, the line (JSON) or row
(Parquet, saved datasets).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Optional

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes (Dataset, DatasetDict)


class TaskFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line or row."""


class Row(NamedTuple):
    """The two fields a task reads from one record, and where the record is."""

    prompt: str
    answer: str
    where: str  # "data.jsonl:12" or "data.parquet row 12", for error messages


def first_bad_json_line(path: Path) -> str | None:
    """`file:line: reason` for the first line of a JSON(-lines) file that does not parse, else None."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON array: the decoder knows the line
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})"
        if not isinstance(record, dict):
            return f"{path}:{number}: expected one JSON object per line, got {type(record).__name__}"
    return None


def record_locations(path: Path, count: int) -> list[str]:
    """Where each of the `count` records sits: the line of a JSON-lines file, else the row number."""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.lstrip().startswith("["):
            lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
            if len(lines) == count:
                return [f"{path}:{n}" for n in lines]
    return [f"{path} row {i}" for i in range(1, count + 1)]


def is_hub_id(path: str) -> bool:
    """`owner/name` that names nothing on disk and does not end like a data file: a hub data set."""
    location = Path(path).expanduser()
    return bool(HUB_ID.fullmatch(path)) and not location.exists() and location.suffix.lower() not in SUFFIXES


def load_with_load_dataset(path: str, config_name: Optional[str], split: str):
    """`datasets.load_dataset(path, name=config_name, split=split)`: a hub id, or a data set
    repository on disk laid out like one (the same code path, so it is tested offline)."""
    import datasets

    try:
        return datasets.load_dataset(path, name=config_name, split=split)
    except Exception as err:  # noqa: BLE001 - not found, offline, unknown split or config: one line
        reason = " ".join(str(err).split())  # one line: datasets' messages span several
        raise TaskFileError(f"{path}: datasets.load_dataset(name={config_name!r}, split={split!r}) failed "
                            f"(task.config_name, task.split): {type(err).__name__}: {reason}") from err


def load_dataset_file(path: str, split: str = "train", config_name: Optional[str] = None):
    """Load `path` as a `datasets.Dataset`: a file, a saved `Dataset`/`DatasetDict` (its
    `split`), or through `load_dataset` a hub id or a repository directory (its `split` of
    configuration `config_name`)."""
    import datasets  # imported lazily: pyarrow and pandas cost ~1 s, and arithmetic needs neither

    datasets.disable_progress_bars()  # prompt sets are small; bars would garble the run's console
    if is_hub_id(path):
        return load_with_load_dataset(path, config_name, split)
    location = Path(path).expanduser()
    if not location.exists():
        raise TaskFileError(f"{location}: no such file or directory")
    if location.is_dir() and not any((location / marker).exists() for marker in SAVED_MARKERS):
        return load_with_load_dataset(str(location), config_name, split)  # a data set repository
    if location.is_dir():
        try:
            loaded = datasets.load_from_disk(str(location))
        except FileNotFoundError as err:
            raise TaskFileError(f"{location}: not a directory written by save_to_disk ({err})") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise TaskFileError(f"{location}: no split {split!r}; its splits are {sorted(loaded)}")
            return loaded[split]
        return loaded
    kind = SUFFIXES.get(location.suffix.lower())
    if kind is None:
        raise TaskFileError(f"{location}: unknown file type; use {', '.join(SUFFIXES)} or a save_to_disk directory")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own report names a block row, not the line
    try:
        if kind == "json":
            return datasets.Dataset.from_json(str(location))
        return datasets.Dataset.from_parquet(str(location))
    except Exception as err:  # noqa: BLE001 - turned into a message that names the line
        bad_line = first_bad_json_line(location) if kind == "json" else None
        if bad_line:
            raise TaskFileError(bad_line) from None  # the message says it all; pyarrow's chain would bury it
        raise TaskFileError(f"{location}: cannot be read as {kind}: {err.__cause__ or err}") from err
    finally:
        datasets.logging.set_verbosity(verbosity)


def read_rows(path: str, split: str, prompt_key: str, answer_key: str, config_name: Optional[str] = None) -> list[Row]:
    """The prompt and answer of every record, checked to be present and non-empty."""
    dataset = load_dataset_file(path, split, config_name)
    location = Path(path).expanduser()
    for key, option in ((prompt_key, "task.prompt_key"), (answer_key, "task.answer_key")):
        if key not in dataset.column_names:
            raise TaskFileError(f"{location}: no field {key!r} ({option}); its fields are {dataset.column_names}")
    if len(dataset) == 0:
        raise TaskFileError(f"{location}: no records")
    rows = []
    places = record_locations(location, len(dataset))
    for where, prompt, answer in zip(places, dataset[prompt_key], dataset[answer_key]):
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskFileError(f"{where}: field {prompt_key!r} is {prompt!r}; expected non-empty text")
        if answer is None or not str(answer).strip():
            raise TaskFileError(f"{where}: field {answer_key!r} is {answer!r}; expected a reference answer")
        rows.append(Row(prompt, str(answer), where))
    return rows
