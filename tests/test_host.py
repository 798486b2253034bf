"""The host settings: freed memory is reused instead of faulted in again (glibc)."""

import subprocess
import sys

import pytest
import torch

from gspo_cli.train.host import _mallopt, configure_host

# A fresh interpreter (the heap of the test process depends on what ran before) writes a
# 40 MiB tensor fourteen times and prints the page faults of each write. 40 MiB is over glibc's
# largest mmap threshold (32 MiB), so by default each one is a fresh mapping faulted in page by page.
FAULTS_PER_WRITE = """
import resource, sys, torch
from gspo_cli.train.host import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
faults = []
for _ in range(14):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def faults_per_write(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_WRITE, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(_mallopt() is None, reason="glibc's mallopt only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 40 * 2**20 // 4096
    assert all(n >= pages for n in faults_per_write("default"))  # every write faults all its pages in
    # torch asks for 64-byte aligned blocks, a little more than a freed block of the same size, and
    # glibc keeps the small split-off remainder in its per-thread cache (7 entries), which pins the
    # freed block: the heap grows some 8 to 10 times before the freed blocks merge and are reused.
    assert max(faults_per_write("reuse")[-3:]) < pages // 100


def test_configure_host_sets_the_thread_count():
    threads = torch.get_num_threads()
    try:
        configure_host(num_threads=1, keep_freed_memory=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device, setting, tokens, applied", [
    ("cpu", None, 8, True), ("cuda", None, 8, False), ("cuda:1", None, 8, False), ("cuda", True, 8, True),
    ("cpu", False, 8, False),
    ("cpu", None, 1024, False),  # long responses: the never-trimmed heap would keep a high-water mark
    ("cpu", True, 1024, True)])  # ... unless asked
def test_keep_freed_memory_defaults_to_cpu_runs_of_short_responses(monkeypatch, device, setting, tokens, applied):
    import gspo_cli.train.host as host

    calls = []
    monkeypatch.setattr(host, "reuse_freed_memory", lambda: calls.append(True) or True)
    configure_host(0, setting, device, max_new_tokens=tokens)
    assert bool(calls) == applied


def test_cpu_kernels_default_to_cpu_runs_only(tiny_model_dir):
    """`model.experts_implementation=auto` and `model.fused_rms_norm=null` switch this tool's
    CPU kernels on for CPU runs; elsewhere (here the meta device) transformers' code runs."""
    from gspo_cli.models.kernels import experts
    from gspo_cli.models.loading import load_model

    def kernels(model):
        fused = [m for m in model.modules()  # fuse_rms_norms binds forward per module
                 if type(m).__name__.endswith("RMSNorm") and "forward" in vars(m)]
        return model.config._experts_implementation == experts.NAME, bool(fused)

    assert kernels(load_model(tiny_model_dir, device="cpu")) == (True, True)
    assert kernels(load_model(tiny_model_dir, device="meta")) == (False, False)
    assert kernels(load_model(tiny_model_dir, device="meta", experts_implementation=experts.NAME,
                              fused_rms_norm=True)) == (True, True)
