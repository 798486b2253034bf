"""Numeric precision of the training passes: bf16 autocast when `hardware.precision=bf16`."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: str, precision: str, strategy: str, distributed: bool):
    """bf16 autocast for `precision=bf16` (FSDP2 handles it itself through its policy)."""
    if precision != "bf16" or (distributed and strategy == "fsdp"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
