"""The CPU allocator settings (nanochat.cpu_memory) and the CPU head chunk: a
training step's head reuses freed memory instead of mapping fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from nanochat import ops
from nanochat.common import compute_init

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# A fresh process writes one 16 MiB block (a head chunk on CPU, ops.CPU_HEAD_CHUNK_ELEMENTS)
# and frees it; glibc's mallinfo2 says where the block lived (mmapped bytes added while it
# is alive) and what the heap kept of it after the free. Page-fault counts of whole steps
# say the same but vary from run to run; these do not.
BLOCK = """
import ctypes, sys, torch
from nanochat.cpu_memory import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2()
block = torch.ones(2**22)
mapped = libc.mallinfo2().hblkhd - before.hblkhd
del block
print(mapped, libc.mallinfo2().arena - before.arena)
"""
MIB = 2**20


def block_fate(mode: str) -> tuple[int, int]:
    """(bytes the 16 MiB block added to mmapped blocks while alive, to the heap after its free)."""
    done = subprocess.run([sys.executable, "-c", BLOCK, mode], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    mapped, heap = done.stdout.split()
    return int(mapped), int(heap)


@pytest.mark.skipif(not GLIBC, reason="mallopt and mallinfo2 are glibc's")
def test_kept_memory_serves_a_head_chunk_from_the_heap_and_keeps_it():
    # glibc's defaults: a fresh mmap for the block, unmapped on free, so the next step faults it in again
    mapped, heap = block_fate("default")
    assert mapped >= 16 * MIB and heap < 16 * MIB
    # kept: the block comes from the heap, and the heap keeps it for the next step
    mapped, heap = block_fate("keep")
    assert mapped < 16 * MIB and heap >= 16 * MIB


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
