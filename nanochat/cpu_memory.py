"""Keep freed memory in the process on CPU instead of handing it back to the kernel.

torch's CPU allocator is the C library's malloc. glibc's defaults return freed
memory at the top of the heap to the kernel (trim) and serve large blocks with
fresh mmaps, so a training step that frees and reallocates the same activations
every step pays a page fault per 4 KiB each time: at depth 4 on CPU about 90,000
faults and a tenth of the CPU time per step (bench/README.md, "Training"). With
the settings below a step reuses the memory the previous one freed; the process
keeps its peak footprint, which the next step needs anyway.

Only on Linux with glibc (mallopt); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# 32 MiB is the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2);
# blocks above it are still mmapped, which is why ops.CPU_HEAD_CHUNK_ELEMENTS stays below.
SETTINGS = {
    M_MMAP_THRESHOLD: 32 * 2**20,
    M_TRIM_THRESHOLD: 2**30,  # free memory kept at the heap's top before any goes back
    M_TOP_PAD: 64 * 2**20,  # grow the heap in large steps: fewer brk calls
}

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process; True when glibc took them all."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    accepted = [libc.mallopt(param, value) == 1 for param, value in SETTINGS.items()]  # each one, even after a refusal
    return all(accepted)
