"""Checkpoints that let a run continue exactly: atomic, self-contained, safe to load.

A checkpoint is a directory `checkpoints/step_<N>/` holding

- `model/`: the policy and its tokenizer (`save_pretrained`, safetensors); with LoRA the
  adapters only, in `peft`'s format (the base model is the run's starting point);
- `trainer_state.pt`: optimizer, scheduler, the step, the prompt stream's position, every
  random number generator of every rank (`rng`: a list indexed by rank, gathered to rank 0,
  which writes the file), the W&B run id, and with `trainer.staleness` every rank's queued
  rollout batches (`rollouts`, a list indexed by rank, `train/stale.py`) — tensors and plain Python values only, so it
  loads with `torch.load(weights_only=True)` and never runs pickled code.

It is written to a hidden temporary directory and renamed into place only when complete,
so a process killed at any moment leaves either the previous checkpoints or the new one,
never half of one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gspo_cli.models.storage import move_into_place, write_dir_atomically
from gspo_cli.train.distributed import DistEnv

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.pt"
MODEL_FILES = ("config.json", "adapter_config.json")  # a whole model, or a LoRA run's adapters (`peft`)


def rng_state(generator: torch.Generator, sampling_generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """This process's Python, NumPy and torch states, its CPU generator's (mini-batch order, and
    sampling on CPU) and its GPU sampling generator's (None without one), as weights-only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "sampling": None if sampling_generator is None else sampling_generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator,
                  sampling_generator: Optional[torch.Generator] = None) -> None:
    """Restore what `rng_state` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if sampling_generator is not None and state.get("sampling") is not None:
        sampling_generator.set_state(state["sampling"])


def gather_rng_states(state: dict[str, Any], env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's `rng_state`, in rank order, on rank 0 (the other ranks get []); called on every rank.

    Each rank draws its own samples (its generators are seeded `seed + rank`), so an exact resume
    needs each rank's states back, not rank 0's on every rank."""
    return gather_per_rank(state, env)


def gather_per_rank(value: Any, env: DistEnv) -> list[Any]:
    """Every rank's `value` (tensors on the CPU and plain values), in rank order, on rank 0 (the
    other ranks get []); called on every rank. Random states, and `trainer.staleness`'s queued rollouts."""
    if not env.distributed:
        return [value]
    import torch.distributed as dist

    values: Optional[list] = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, values, dst=0)  # NCCL: through the GPU that init_distributed set
    return values or []


def own_rng_state(trainer_state: dict[str, Any], env: DistEnv) -> Optional[dict[str, Any]]:
    """This rank's saved random states; None when the checkpoint was written by another number of ranks."""
    states = trainer_state["rng"]
    if isinstance(states, dict):  # written before states were kept per rank: rank 0's alone
        states = [{**states, "sampling": trainer_state.get("sampling_rng")}]
    return states[env.rank] if len(states) == env.world_size else None


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write `checkpoints/step_<step>/` atomically and delete all but the newest `keep_last`.

    Args:
        step: the number of completed RL steps (training continues at this step).
        trainer_state: optimizer/scheduler state dicts, stream position, RNG states, ids.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save({**trainer_state, "step": step}, tmp / STATE_FILE)

    # replace: the same step may be saved again (e.g. on a signal right after a periodic save)
    target = write_dir_atomically(Path(run_dir) / "checkpoints" / f"step_{step}", write, replace=True)
    prune_checkpoints(run_dir, keep_last)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / STATE_FILE).exists() and any((p / "model" / f).exists() for f in MODEL_FILES)]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all)."""
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, loaded without unpickling arbitrary objects."""
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=True)


# ---------------------------------------------------------------------------- FSDP2: sharded


SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files of model and optimizer


def save_sharded_checkpoint(run_dir: Path, step: int, model, optimizer, tokenizer, trainer_state: dict[str, Any],
                            keep_last: int, is_main: bool) -> Path:
    """Save an FSDP2 model and optimizer with torch.distributed.checkpoint (every rank its shards).

    Called on every rank. Rank 0 also writes the tokenizer and the rest of the trainer state;
    the directory is renamed into place once every rank has written its part.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    root = Path(run_dir) / "checkpoints"
    tmp, target = root / f".tmp-step_{step}", root / f"step_{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = trained_state(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))
    if is_main:
        tokenizer.save_pretrained(tmp / "model")
        model.config.save_pretrained(tmp / "model")
        torch.save({**{k: v for k, v in trainer_state.items() if k != "optimizer"}, "step": step}, tmp / STATE_FILE)
        move_into_place(tmp, target)
        prune_checkpoints(run_dir, keep_last)
    dist.barrier()
    return target


def trainable_only(model) -> Any:
    """DCP state-dict options that leave frozen parameters out (a LoRA run's base model; without
    LoRA every parameter trains). Loading is then strict only when nothing is frozen: the frozen
    weights come from the starting model, not from the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=all(p.requires_grad for p in model.parameters()))


def trained_state(model, optimizer=None) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The model and optimizer state a sharded checkpoint holds: everything but frozen parameters
    (a LoRA run's base model is its starting point's, not saved again)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [],
                                              options=trainable_only(model))
    # a tied weight (lm_head = embed_tokens) is listed under both names, and DCP leaves out only one
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state if optimizer is not None else None


def load_sharded_model(model, checkpoint: Path, optimizer=None) -> None:
    """Load model (and optimizer) state saved by `save_sharded_checkpoint` into `model`.

    Works at any world size, one process included: torch.distributed.checkpoint reshards
    the saved tensors onto however `model` is sharded now.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optim_state = trained_state(model, optimizer)
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDED_DIR))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}), options=trainable_only(model))


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint holds DCP shards instead of a `save_pretrained` model."""
    return (Path(checkpoint) / SHARDED_DIR).is_dir()
