"""Process-wide settings of the host CPU side: torch's thread count and the C allocator.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc serves every request
above its mmap threshold (at most 32 MiB, 128 KiB at first) with a fresh `mmap` and unmaps
it on `free`, so a training step that allocates a 76 MB expert projection gets new pages
every time and the kernel faults and zeroes each 4 KiB page again, inside the matmul
that first writes them. On the benchmark model that made the expert forward pass run at
~170 GFLOP/s instead of ~240 (same kernel, same shapes) and cost ~0.5 M page faults per
step. Serving all requests from the heap and never trimming it lets each step reuse the
pages of the one before, the way jemalloc or tcmalloc would, without preloading either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional

import torch

from gspo_cli.config import on_cpu_by_default

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = -1  # as the trim threshold: never give the heap's free top back (mallopt(3))


@functools.lru_cache(maxsize=None)
def _mallopt():
    """glibc's `mallopt`, or None on a C library without one (macOS, musl)."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that ignores these parameters
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def reuse_freed_memory() -> bool:
    """Keep freed host memory in the process for the next allocation; False where unsupported.

    Memory is no longer returned to the system while the process runs: its resident size
    stays at its peak, which a training process reaches in its first step anyway.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # M_MMAP_MAX=0: no request is served by mmap, so no block is unmapped on free;
    # a trim threshold of -1: the heap's free top is not given back either.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


# Above this response length the CPU default gives freed memory back: a heap that is never
# trimmed keeps its high-water mark, and with long responses over a large vocabulary that mark
# grows far past what is live (issue 17's step of 128 responses of 1,024 tokens over 151,936
# tokens: 10.9 GiB peak resident kept, 3.68 GiB given back; docs/long-responses.md).
LONG_RESPONSES = 256


def configure_host(num_threads: int, keep_freed_memory: Optional[bool], device: str = "cpu",
                   max_new_tokens: int = 0) -> None:
    """Apply `hardware.num_threads` (0: torch's default) and `hardware.keep_freed_memory`
    (None: on for CPU runs of responses up to `LONG_RESPONSES` tokens only)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if keep_freed_memory is None and max_new_tokens > LONG_RESPONSES:
        keep_freed_memory = False
    if on_cpu_by_default(keep_freed_memory, device):
        reuse_freed_memory()
