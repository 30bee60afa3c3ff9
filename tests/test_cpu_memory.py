"""The CPU allocator settings (nanochat.cpu_memory) and the CPU head chunk: a
training step's head reuses freed memory instead of faulting in fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from nanochat import ops
from nanochat.common import compute_init

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# One head step per iteration at the depth-4 CPU bench's size (4,096 rows, width 256,
# vocab 8,192); prints the minor page faults of the iterations after the first two.
STEPS = """
import resource, sys, torch
from nanochat import ops
from nanochat.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
x = torch.randn(4096, 256, requires_grad=True)
weight = (torch.randn(8192, 256) * 0.05).requires_grad_()
targets = torch.randint(0, 8192, (4096,))
for i in range(6):
    if i == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ops.head_loss(x, weight, targets, torch.ones(4096), 15.0).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_spares_the_page_faults_of_each_step():
    default, kept = faults("default"), faults("keep")
    # at glibc's defaults these four steps fault tens of thousands of pages (76,609 on Xeon-3); kept: 0 there
    assert default > 10_000
    assert kept < default / 10


def test_cpu_chunks_stay_below_the_mmap_ceiling_and_cuda_keeps_its_own():
    cpu = ops._chunk_rows(8192, torch.device("cpu"))
    assert cpu * 8192 * 4 <= 32 * 2**20
    assert ops._chunk_rows(8192, torch.device("cuda")) == ops.HEAD_CHUNK_ELEMENTS // 8192 > cpu


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_compute_init_on_cpu_applies_the_settings(monkeypatch):
    from nanochat import cpu_memory

    monkeypatch.setattr(cpu_memory, "_applied", None)
    compute_init("cpu")
    assert cpu_memory._applied is True
