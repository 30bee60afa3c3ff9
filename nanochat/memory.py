"""Will a training run fit? Its peak memory, measured before the first step
by running that step on fake tensors, against what the device has free, so a
batch that cannot fit is refused in seconds rather than found out by an
out-of-memory error later.

- measure_training_memory(config, device_batch_size, seq_len, dtype,
  world_size, stage, checkpoint_blocks) -> MemoryEstimate: peak bytes of one rank by part
  (parameters, gradients, optimizer, activations, temporaries, overhead).
  The tensors are measured by nanochat.fake_step (the real step, on fake
  tensors: nothing allocated, no GPU needed, ~10 s at depth 20 on one CPU
  core); the overhead is a fixed allowance for what is not a tensor.
  Cached per arguments in-process.
- choose_device_batch(...) -> (device batch or None, message lines): the
  verdict a training stage prints before step 1, with the largest power of
  two dividing the requested batch that fits when the requested one does not.
- `python -m nanochat.memory --depth 20 --batch-size 32` prints `peak N.N GiB`,
  then the parts in GiB, one per line, then how long measuring took.

What is measured is the eager step with the CPU device's kernels, the only
ones that can be faked without a GPU. The model's tensors are the same on
CUDA; its fused AdamW and Muon's bf16 Newton-Schulz need fewer optimizer
temporaries there, and torch.compile decides for itself what to keep for
backward, which is not measured here (the margin covers it).

- memory_in_use(device) -> MemoryUse: what the process uses now (the driver's
  figure, torch's allocated and reserved), for every logged step: no subprocess.
- explain_out_of_memory(device, batch, estimate) -> str: what to do after an
  out-of-memory error: drop the page cache, or halve the batch.

On a DGX Spark (GB10) the GPU has no memory of its own: CPU and GPU share
128 GB, nvidia-smi reports no GPU memory, and what the run can count on is the
kernel's MemAvailable less the page cache (see unified_available). Elsewhere
on CUDA it is the GPU's free memory.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.stages import STAGES
from nanochat.flags import FlagParser
from nanochat.gpt import GPTConfig, config_for_depth

GIB = 2**30
# What a run holds besides tensors, which MemTracker cannot see: the CUDA
# context (~0.5 GiB), cuBLAS and Triton workspaces, torch.compile's kernels,
# the data loader's buffers. A round allowance, not measured on a Spark.
FIXED_OVERHEAD_BYTES = 2 * GIB
# Only this share of the available memory is planned for: the caching
# allocator fragments (a few % when block sizes vary), and on unified memory
# the OS and the page cache, which grows as the loader reads shards, draw from
# the same 128 GB. A guess, not tuned on a Spark.
DEFAULT_MARGIN = 0.9
BATCH_FLAG = "--device-batch-size"  # the training stages' flag a suggestion names
MEMINFO = Path("/proc/meminfo")
PROC_STATUS = Path("/proc/self/status")
NVIDIA_SMI_TIMEOUT_S = 10.0
# How a user frees the page cache (Linux's Documentation/admin-guide/sysctl/vm.rst, drop_caches; the
# remedy NVIDIA's DGX Spark material gives for allocation failures on unified memory).
DROP_CACHES = "sync; echo 3 | sudo tee /proc/sys/vm/drop_caches"
# Page cache below this is not worth blaming for an out-of-memory error: a round figure, a few % of a
# Spark's 128 GB; one pretraining shard of ours is ~0.1 GiB, a depth-20 checkpoint several GiB.
PAGE_CACHE_WORTH_DROPPING = 4 * GIB


@dataclass(frozen=True)
class MemoryEstimate:
    """Measured peak bytes of one rank, by part, and what was measured."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int
    overhead: int
    config: GPTConfig
    device_batch_size: int
    seq_len: int
    dtype: torch.dtype
    world_size: int = 1
    stage: str = "base"
    checkpoint_blocks: bool = False  # blocks recomputed in backward (--activation-checkpointing)

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "temporaries": self.temporaries, "overhead": self.overhead,
        }

    def with_batch_size(self, device_batch_size: int) -> MemoryEstimate:
        """The same run at another device batch, measured (or taken from the cache)."""
        return measure_training_memory(self.config, device_batch_size, self.seq_len, self.dtype, self.world_size,
                                       self.stage, self.checkpoint_blocks)


# ---------------------------------------------------------------- measuring


def _check_arguments(device_batch_size: int, seq_len: int, dtype: torch.dtype, world_size: int, stage: str) -> None:
    if device_batch_size < 1 or seq_len < 1 or world_size < 1:
        raise ValueError(
            f"device_batch_size ({device_batch_size}), seq_len ({seq_len}) and world_size ({world_size}) must be positive"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point compute dtype, got {dtype}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


@functools.lru_cache(maxsize=64)
def _measured_parts(config_items: tuple, device_batch_size: int, seq_len: int, dtype: torch.dtype, stage: str,
                    checkpoint_blocks: bool) -> tuple[tuple[str, int], ...]:
    """The tensors' peak by part on one rank; keyed on the config's fields,
    as GPTConfig itself is not hashable. Stages may ask twice (a check, then a
    suggestion's re-check), and a measurement takes seconds."""
    from nanochat.fake_step import measure_fake_step  # lazily: see nanochat.fake_step

    config = GPTConfig.from_dict(dict(config_items))
    return tuple(measure_fake_step(config, device_batch_size, seq_len, dtype, stage, checkpoint_blocks).items())


def measure_training_memory(config: GPTConfig, device_batch_size: int, seq_len: int, dtype: torch.dtype,
                            world_size: int = 1, stage: str = "base", checkpoint_blocks: bool = False) -> MemoryEstimate:
    """Peak memory of one training rank at `device_batch_size` x `seq_len`
    tokens per micro-batch, the model computing in `dtype`, measured by
    running training steps on fake tensors (nanochat.fake_step), plus
    FIXED_OVERHEAD_BYTES. `stage` "rl" runs the per-token weighted loss;
    `checkpoint_blocks` recomputes each block in backward, as
    --activation-checkpointing (GPT.checkpoint_blocks) does."""
    _check_arguments(device_batch_size, seq_len, dtype, world_size, stage)
    key = tuple(sorted(config.to_dict().items()))
    parts = dict(_measured_parts(key, device_batch_size, seq_len, dtype, stage, checkpoint_blocks))
    # With several ranks our optimizers shard their state (nanochat.optim):
    # each rank keeps about 1/world_size of it (DistMuon owns whole matrices,
    # so it is uneven when their count does not divide). Measured with one
    # rank, as faking a process group is more machinery than this division;
    # the sharded step's communication buffers are left to the margin.
    parts["optimizer"] = math.ceil(parts["optimizer"] / world_size)
    return MemoryEstimate(
        **parts, overhead=FIXED_OVERHEAD_BYTES, config=config, device_batch_size=device_batch_size,
        seq_len=seq_len, dtype=dtype, world_size=world_size, stage=stage, checkpoint_blocks=checkpoint_blocks,
    )


# ---------------------------------------------------------------- what the machine has


def read_kib_fields(path: Path) -> dict[str, int]:
    """The "Name:  1234 kB" lines of a /proc file (meminfo, status), in bytes."""
    fields = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * 1024
    return fields


def system_available(meminfo: Path = MEMINFO) -> tuple[int | None, str]:
    """The kernel's estimate of memory that can be taken without swapping (page cache included)."""
    if not meminfo.exists():
        return None, f"unknown ({meminfo} does not exist on this system)"
    fields = read_kib_fields(meminfo)
    if "MemAvailable" in fields:
        return fields["MemAvailable"], f"MemAvailable in {meminfo}"
    return fields.get("MemFree"), f"MemFree in {meminfo} (this kernel has no MemAvailable)"


def page_cache(fields: dict[str, int]) -> int:
    """Bytes of file pages on the kernel's LRU lists (Active(file) + Inactive(file)): the page cache
    MemAvailable counts as reclaimable (si_mem_available in the kernel's mm/, "pagecache"). Shared
    memory is not in these lists, so it is neither counted nor subtracted."""
    return fields.get("Active(file)", 0) + fields.get("Inactive(file)", 0)


def unified_available(meminfo: Path = MEMINFO) -> tuple[int | None, str]:
    """What a GPU sharing the CPU's memory can count on: MemAvailable less the page cache in it.

    MemAvailable assumes the kernel gives the page cache back on demand. For the GPU's allocations on a
    GB10 it may not: cudaMemGetInfo leaves the cache out of "free" there (vLLM issue 35313), allocations
    fail, or the OOM killer runs, with tens of GB "available" (NVIDIA forum reports; llama.cpp PR 17368
    reads /proc/meminfo for this reason), and NVIDIA's advice is to drop the cache first. Shards read and
    checkpoints written fill it during a run, so it is named, not planned for."""
    if not meminfo.exists():
        return None, f"unknown ({meminfo} does not exist on this system)"
    fields = read_kib_fields(meminfo)
    if "MemAvailable" not in fields or "Active(file)" not in fields:
        return fields.get("MemFree"), f"MemFree in {meminfo} (this kernel does not split out the page cache)"
    cache = page_cache(fields)
    return max(0, fields["MemAvailable"] - cache), (
        f"MemAvailable in {meminfo} less its {cache / GIB:.1f} GiB of page cache, which the GPU cannot count on "
        f"(`{DROP_CACHES}` frees it)")


def process_rss(status: Path = PROC_STATUS) -> tuple[int | None, str]:
    if not status.exists():
        return None, f"unknown ({status} does not exist on this system)"
    return read_kib_fields(status).get("VmRSS"), f"VmRSS in {status}"


def nvidia_smi_memory_total(index: int) -> str | None:
    """nvidia-smi's memory.total for GPU `index` as printed ("[N/A]" on a GB10); None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits", f"--id={index}"],
                              capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def is_unified_memory(device_name: str, machine: str, smi_memory_total: str | None) -> bool:
    """A GPU sharing the CPU's memory: a GB10, or an Arm machine whose GPU
    reports no dedicated memory of its own."""
    if "GB10" in device_name:
        return True
    no_dedicated = smi_memory_total is not None and ("N/A" in smi_memory_total or "Not Supported" in smi_memory_total)
    return machine == "aarch64" and no_dedicated


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _unified_gpu(index: int) -> bool:
    # Asked once per GPU and process: nvidia-smi is a subprocess (tens of ms to seconds) and the answer
    # cannot change while the process runs; the training loop asks at every logged step.
    name = torch.cuda.get_device_name(index)
    return is_unified_memory(name, platform.machine(), None if "GB10" in name else nvidia_smi_memory_total(index))


def _unified(device: torch.device) -> bool:
    return _unified_gpu(_cuda_index(device))


def available_memory(device: torch.device, meminfo: Path = MEMINFO) -> tuple[int | None, str]:
    """(bytes this process can use, where the figure comes from); None when it cannot be known.

    What torch already holds counts as available, since the estimate includes it.
    """
    if device.type != "cuda":
        return system_available(meminfo)
    held = torch.cuda.memory_reserved(device)
    if _unified(device):
        free, source = unified_available(meminfo)
        if free is None:
            return None, source
        return free + held, f"{source}; unified memory: CPU and GPU share it; + {held / GIB:.1f} GiB torch holds"
    free, total = torch.cuda.mem_get_info(device)
    return free + held, f"free GPU memory of {total / GIB:.1f} GiB + {held / GIB:.1f} GiB torch holds"


@dataclass(frozen=True)
class MemoryUse:
    """What a training process uses now, as the log and metrics.jsonl report it. `used` is the driver's
    figure on CUDA (cudaMemGetInfo: total - free, every process on the GPU; on unified memory the whole
    machine, page cache included), the resident size on CPU; `allocated` (live tensors) and `reserved`
    (what torch's caching allocator holds from the driver) only on CUDA."""

    used: int | None
    source: str
    allocated: int | None = None
    reserved: int | None = None

    def metrics(self) -> dict:
        gib = {"memory_gib": self.used, "allocated_gib": self.allocated, "reserved_gib": self.reserved}
        return {name: None if size is None else size / GIB for name, size in gib.items()
                if size is not None or name == "memory_gib"}

    def describe(self) -> str:
        text = "n/a" if self.used is None else f"{_gib(self.used)} GiB"
        torch_held = ""
        if self.allocated is not None:
            torch_held = f"; torch: {_gib(self.allocated)} GiB allocated, {_gib(self.reserved)} GiB reserved"
        return f"{text} ({self.source}){torch_held}"


def memory_in_use(device: torch.device, status: Path = PROC_STATUS) -> MemoryUse:
    """What this process uses now, without a subprocess: cheap enough for every logged step."""
    if device.type != "cuda":
        used, source = process_rss(status)
        return MemoryUse(used, source)
    free, total = torch.cuda.mem_get_info(device)
    whose = "the whole machine's, page cache included (unified memory)" if _unified(device) else "every process on the GPU"
    return MemoryUse(total - free, f"cudaMemGetInfo of {_gib(total)} GiB: {whose}",
                     torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def peak_memory_line(device: torch.device, estimate: int | None) -> str | None:
    """The first step's peaks on a GPU, torch's allocated and reserved, and the driver's figure, next to what
    was estimated before it (None off CUDA, where torch keeps no peaks). Reserved above allocated is the
    caching allocator's slack (fragmentation), which the estimate's margin has to cover."""
    if device.type != "cuda":
        return None
    now = memory_in_use(device)
    planned = "n/a" if estimate is None else f"{_gib(estimate)} GiB"
    return (f"peak memory {_gib(torch.cuda.max_memory_allocated(device))} GiB allocated, "
            f"{_gib(torch.cuda.max_memory_reserved(device))} GiB reserved (torch); estimated {planned}; "
            f"in use now {_gib(now.used)} GiB ({now.source})")


def explain_out_of_memory(device: torch.device, device_batch_size: int, estimate: int | None = None,
                          meminfo: Path = MEMINFO) -> str:
    """What to do after a torch.OutOfMemoryError: on unified memory holding a sizeable page cache that
    the step would fit without (`estimate`, bytes, when known), drop the cache; otherwise the batch is too
    large for the device: halve it. Either way the same command continues from the last checkpoint."""
    if device_batch_size > 1:
        smaller = (f"run again with {BATCH_FLAG} {device_batch_size // 2} (gradient accumulation keeps the total "
                   "batch, so results stay comparable): it continues from the last checkpoint")
    else:
        smaller = f"not even {BATCH_FLAG} 1 fits: use a smaller --depth, a shorter --max-seq-len, or more GPUs"
    cache = _page_cache_to_blame(device, estimate, meminfo)
    if cache is None:
        return f"out of memory at {BATCH_FLAG} {device_batch_size}; {smaller}"
    return (f"out of memory at {BATCH_FLAG} {device_batch_size} with {_gib(cache)} GiB of this machine's memory in "
            f"the page cache (shards read, checkpoints written), which the GPU's allocations do not reliably get "
            f"back on unified memory: run `{DROP_CACHES}`, then the same command (it continues from the last "
            f"checkpoint); if it runs out again with the cache dropped, {smaller}")


def _page_cache_to_blame(device: torch.device, estimate: int | None, meminfo: Path) -> int | None:
    """The page cache's size when it, not the batch, is the likely cause of an out-of-memory error."""
    if device.type != "cuda" or not _unified(device) or not meminfo.exists():
        return None
    fields = read_kib_fields(meminfo)
    cache = page_cache(fields)
    if cache < PAGE_CACHE_WORTH_DROPPING:
        return None
    room = fields.get("MemAvailable", 0) + torch.cuda.memory_reserved(device)
    if estimate is not None and estimate > room:
        return None  # even with the cache given back the step does not fit
    return cache


# ---------------------------------------------------------------- the verdict


def power_of_two_divisors_below(batch: int) -> list[int]:
    """1, 2, 4, ... below `batch` that divide it, ascending: device batches the
    requested one is a whole multiple of, so gradient accumulation can keep the
    tokens of each optimizer step."""
    return [2**k for k in range(batch.bit_length()) if 2**k < batch and batch % 2**k == 0]


def largest_fitting_batch(estimate: MemoryEstimate, budget: float) -> int | None:
    """The largest power of two below the device batch and dividing it whose
    measured peak fits `budget` bytes; None when not even 1 does."""
    candidates = power_of_two_divisors_below(estimate.device_batch_size)
    # The peak grows with the batch, so the fitting candidates come first:
    # bisecting measures about log2 of their number instead of each one.
    fitting, above = 0, len(candidates)
    while fitting < above:
        middle = (fitting + above) // 2
        if estimate.with_batch_size(candidates[middle]).total <= budget:
            fitting = middle + 1
        else:
            above = middle
    return candidates[fitting - 1] if fitting else None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"


def describe(estimate: MemoryEstimate) -> str:
    parts = " + ".join(f"{name} {_gib(size)}" for name, size in estimate.parts().items())
    dtype = str(estimate.dtype).removeprefix("torch.")
    ranks = f"{estimate.world_size} rank{'s' if estimate.world_size > 1 else ''}"
    recompute = ", activation checkpointing" if estimate.checkpoint_blocks else ""
    return (f"measured peak memory of a {estimate.stage} training step at device batch {estimate.device_batch_size} x "
            f"{estimate.seq_len} tokens, {dtype}, {ranks}{recompute}: {_gib(estimate.total)} GiB = {parts} GiB")


def _verdict(estimate: MemoryEstimate, available: tuple[int | None, str], margin: float) -> tuple[int | None, list[str]]:
    """(the device batch to use, None when none fits; the lines that say why).
    Unknown available memory passes, saying it was not checked."""
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    free, source = available
    batch, lines = estimate.device_batch_size, [describe(estimate)]
    if free is None:
        return batch, [*lines, f"available memory: {source}; not checked"]
    budget = free * margin
    lines.append(f"available: {_gib(free)} GiB ({source}); planning for {margin:.0%} of it, {_gib(budget)} GiB")
    if estimate.total <= budget:
        return batch, [*lines, "fits"]
    smaller = largest_fitting_batch(estimate, budget)
    if smaller is None:
        lines.append(f"does not fit, even at {BATCH_FLAG} 1 ({_gib(estimate.with_batch_size(1).total)} GiB): "
                     "use a smaller --depth, a shorter --max-seq-len, or more GPUs")
    else:
        lines.append(f"does not fit: {BATCH_FLAG} {smaller} would ({_gib(estimate.with_batch_size(smaller).total)} GiB), "
                     f"the largest power of two dividing {batch} that does; gradient accumulation keeps the total "
                     "batch, so results stay comparable")
    return smaller, lines


def choose_device_batch(config: GPTConfig, requested_batch: int, seq_len: int, dtype: torch.dtype, world_size: int,
                        available: tuple[int | None, str], stage: str = "base", margin: float = DEFAULT_MARGIN,
                        checkpoint_blocks: bool = False) -> tuple[int | None, list[str]]:
    """The device batch a stage should train with, before step 1: the requested
    one if its measured peak fits `margin` of `available` (as available_memory
    returns it), else the largest power of two dividing it that does, else
    None; and the lines to print, which name BATCH_FLAG. Pass the model's
    checkpoint_blocks: recomputing blocks keeps a fraction of the activations."""
    estimate = measure_training_memory(config, requested_batch, seq_len, dtype, world_size, stage, checkpoint_blocks)
    return _verdict(estimate, available, margin)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = FlagParser(
        prog="python -m nanochat.memory",
        description="Measure the peak memory of a training step on fake tensors: nothing is allocated, no GPU needed.",
    )
    p.add_argument("--depth", type=int, required=True, help="model depth; the rest of the shape follows (config_for_depth)")
    p.add_argument("--batch-size", type=int, required=True, help="device batch size: rows per micro-batch on one rank")
    # 2048 and 65536: base_train's --max-seq-len and tok_train's vocabulary defaults
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size (default %(default)s)")
    p.add_argument("--stage", default="base", choices=list(STAGES),
                   help="training stage; rl measures the per-token weighted loss (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype (default %(default)s)")
    p.add_argument("--world-size", type=int, default=1, help="ranks the optimizer state is sharded over (default %(default)s)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward, as training's flag does")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        config = config_for_depth(args.depth, args.vocab_size, max_seq_len=args.seq_len)
        estimate = measure_training_memory(config, args.batch_size, args.seq_len, getattr(torch, args.dtype),
                                           args.world_size, args.stage, args.activation_checkpointing)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"peak {_gib(estimate.total)} GiB")
    for name, size in estimate.parts().items():
        print(f"{name:<12} {size / GIB:7.2f} GiB")
    recompute = ", activation checkpointing" if args.activation_checkpointing else ""
    print(f"measured in {seconds:.1f} s: depth {args.depth}, batch {args.batch_size} x {args.seq_len}, {args.dtype}, "
          f"stage {args.stage}, world size {args.world_size}{recompute}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
