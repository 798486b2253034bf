"""Directories on disk: content-addressed cache names, and writes that readers never see half done."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def config_hash(*parts: Any) -> str:
    """A short stable hash of configuration values (dataclasses, dicts, scalars)."""
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete directory `tmp` to `target`, replacing an older one of that name."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_dir_atomically(target: Path, write: Callable[[Path], Any], replace: bool = False) -> Path:
    """Call `write(tmp_dir)` and rename the result to `target`, so readers never see half a directory.

    With `replace=False` (caches) a `target` that already exists wins: two processes racing
    to build the same cached directory both succeed and the loser's copy is discarded. With
    `replace=True` (a checkpoint saved again) the new directory replaces the old one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if replace:
            move_into_place(tmp, target)
        else:
            os.replace(tmp, target)
    except OSError:
        if replace or not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
