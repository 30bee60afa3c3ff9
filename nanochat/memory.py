"""Will a training run fit? Its peak memory, estimated by part before the
first step, against what the device has free, so a batch that cannot fit is
refused in seconds rather than found out by an out-of-memory error later.

On a DGX Spark (GB10) the GPU has no memory of its own: CPU and GPU share
128 GB, nvidia-smi reports no GPU memory, and what the run can still take is
the kernel's MemAvailable. Elsewhere on CUDA it is the GPU's free memory.
"""

from __future__ import annotations

import math
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.gpt import GPTConfig

GIB = 2**30
FP32_BYTES = 4
# CUDA context, cuBLAS and Triton workspaces, compiled kernels, data-loader
# buffers: what a run holds besides tensors, roughly.
FIXED_OVERHEAD_BYTES = 2 * GIB
MEMINFO = Path("/proc/meminfo")
PROC_STATUS = Path("/proc/self/status")
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one rank, by part, and what it was estimated for."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    config: GPTConfig
    device_batch_size: int
    seq_len: int
    dtype: torch.dtype
    world_size: int

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "logits and loss": self.logits, "overhead": self.overhead,
        }

    def with_batch_size(self, device_batch_size: int) -> MemoryEstimate:
        return estimate_training_memory(self.config, device_batch_size, self.seq_len, self.dtype, self.world_size)


def parameter_counts(config: GPTConfig) -> tuple[int, int]:
    """(embedding + lm_head, block matrices): what AdamW and Muon each update."""
    c = config
    attention = c.n_embd * (2 * c.n_head + 2 * c.n_kv_head) * c.head_dim  # q, o and k, v projections
    mlp = 2 * c.n_embd * 4 * c.n_embd
    return 2 * c.vocab_size * c.n_embd, c.n_layer * (attention + mlp)


def activation_bytes_per_token(config: GPTConfig, compute_bytes: int) -> int:
    """Bytes autograd keeps per token for the backward pass, all layers together.

    Per layer, in fp32 whatever the compute dtype, because the residual stream
    stays fp32 and the rotary tables are cast to its dtype: the inputs of the
    two norms (2C) and the rotated queries and keys before QK-norm (Q + KV).
    In the compute dtype: the normalised inputs of attention and MLP (2C),
    queries, keys and values as attention sees them (Q + 2KV), the attention
    output (Q), the MLP hidden layer before and after relu^2 (4C + 4C).
    Outside the layers: the embedding and final-norm inputs (2C, fp32) and
    the head's input (C). C = n_embd, Q = query width, KV = key/value width.

    Checked against the tensors autograd saves on CPU (tests/test_memory.py):
    exact in fp32; under bf16 autocast eager keeps ~10% more (each q/k/v
    projection keeps its own bf16 copy of its input), and what torch.compile's
    partitioner keeps was measured at ~5% more.
    """
    c = config
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    fp32_per_layer = 2 * c.n_embd + q + kv
    compute_per_layer = 2 * c.n_embd + (q + 2 * kv) + q + 8 * c.n_embd
    per_layer = fp32_per_layer * FP32_BYTES + compute_per_layer * compute_bytes
    outside_layers = 2 * c.n_embd * FP32_BYTES + c.n_embd * compute_bytes
    return c.n_layer * per_layer + outside_layers


def estimate_training_memory(config: GPTConfig, device_batch_size: int, seq_len: int, dtype: torch.dtype,
                             world_size: int = 1) -> MemoryEstimate:
    """Peak memory of one training rank, an estimate within roughly 30%.

    - parameters and gradients: fp32 (master weights; autocast computes in `dtype`)
    - optimizer: AdamW's two fp32 moments for the embedding and lm_head, Muon's
      one fp32 momentum per block matrix; sharded over `world_size` ranks
    - activations: see activation_bytes_per_token, plus, under a lower-precision
      autocast, the `dtype` copies of the weights it keeps for backward
    - logits and loss: the head's (B*T, V) logits in `dtype`, the fp32
      tanh-capped copy the loss keeps for backward, and one fp32 working
      tensor of that size (the exponentials forward, the gradient backward).
      With a 65K vocabulary this is a third of the total at depth 20.
    - overhead: a fixed allowance for the CUDA context, workspaces and loaders

    The peak is at the loss, when every layer's activations are still held.
    Transients of the optimizer step and allocator fragmentation are left to
    the margin of check_fits.
    """
    if device_batch_size < 1 or seq_len < 1 or world_size < 1:
        raise ValueError(
            f"device_batch_size ({device_batch_size}), seq_len ({seq_len}) and world_size ({world_size}) must be positive"
        )
    compute_bytes = dtype.itemsize
    adamw_params, muon_params = parameter_counts(config)
    num_params = adamw_params + muon_params
    tokens = device_batch_size * seq_len
    weight_copies = (num_params - config.vocab_size * config.n_embd) * compute_bytes if compute_bytes < FP32_BYTES else 0
    return MemoryEstimate(
        parameters=num_params * FP32_BYTES,
        gradients=num_params * FP32_BYTES,
        optimizer=math.ceil((2 * adamw_params + muon_params) * FP32_BYTES / world_size),
        activations=tokens * activation_bytes_per_token(config, compute_bytes) + weight_copies,
        logits=tokens * config.vocab_size * (compute_bytes + 2 * FP32_BYTES),
        overhead=FIXED_OVERHEAD_BYTES,
        config=config, device_batch_size=device_batch_size, seq_len=seq_len, dtype=dtype, world_size=world_size,
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


def _unified(device: torch.device) -> bool:
    index = _cuda_index(device)
    return is_unified_memory(torch.cuda.get_device_name(index), platform.machine(), nvidia_smi_memory_total(index))


def available_memory(device: torch.device, meminfo: Path = MEMINFO) -> tuple[int | None, str]:
    """(bytes this process can use, where the figure comes from); None when it cannot be known.

    What torch already holds counts as available, since the estimate includes it.
    """
    if device.type != "cuda":
        return system_available(meminfo)
    held = torch.cuda.memory_reserved(device)
    if _unified(device):
        free, source = system_available(meminfo)
        if free is None:
            return None, source
        return free + held, f"{source} (unified memory: CPU and GPU share it) + {held / GIB:.1f} GiB torch holds"
    free, total = torch.cuda.mem_get_info(device)
    return free + held, f"free GPU memory of {total / GIB:.1f} GiB + {held / GIB:.1f} GiB torch holds"


def current_usage(device: torch.device, status: Path = PROC_STATUS) -> tuple[int | None, str]:
    """(bytes this process uses now, how it was measured): the tensors torch
    allocated on a discrete GPU; the resident size of the whole process where
    memory is shared (CPU, unified GPU), as every part of the process draws
    from the same pool there."""
    if device.type == "cuda" and not _unified(device):
        peak = torch.cuda.max_memory_allocated(device)
        return torch.cuda.memory_allocated(device), f"torch.cuda.memory_allocated (peak {peak / GIB:.1f} GiB)"
    return process_rss(status)


# ---------------------------------------------------------------- the verdict


def largest_fitting_batch(estimate: MemoryEstimate, budget: float) -> int | None:
    """The largest divisor of the device batch whose estimate fits `budget`
    bytes. Divisors only: the total batch is a multiple of device batch x
    sequence x ranks, and stays one, so gradient accumulation can make it up."""
    batch = estimate.device_batch_size
    for candidate in range(batch - 1, 0, -1):
        if batch % candidate == 0 and estimate.with_batch_size(candidate).total <= budget:
            return candidate
    return None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"


def describe(estimate: MemoryEstimate) -> str:
    parts = " + ".join(f"{name} {_gib(size)}" for name, size in estimate.parts().items())
    dtype = str(estimate.dtype).removeprefix("torch.")
    return (f"estimated peak memory at device batch {estimate.device_batch_size} x {estimate.seq_len} tokens, {dtype}: "
            f"{_gib(estimate.total)} GiB = {parts} GiB")


def check_fits(estimate: MemoryEstimate, available: tuple[int | None, str], margin: float = 0.9) -> tuple[bool, str]:
    """(fits, a message of several lines for the user). Only `margin` of the
    available memory is planned for: the estimate is rough and the allocator
    fragments. Unknown available memory passes, saying it was not checked."""
    free, source = available
    lines = [describe(estimate)]
    if free is None:
        lines.append(f"available memory: {source}; not checked")
        return True, "\n".join(lines)
    budget = free * margin
    lines.append(f"available: {_gib(free)} GiB ({source}); planning for {margin:.0%} of it, {_gib(budget)} GiB")
    if estimate.total <= budget:
        lines.append("fits")
        return True, "\n".join(lines)
    smaller = largest_fitting_batch(estimate, budget)
    if smaller is None:
        lines.append(f"does not fit, even at --device-batch-size 1 ({_gib(estimate.with_batch_size(1).total)} GiB): "
                     "use a smaller --depth, a shorter --max-seq-len, or more GPUs")
    else:
        lines.append(f"does not fit: --device-batch-size {smaller} would ({_gib(estimate.with_batch_size(smaller).total)} GiB); "
                     "gradient accumulation keeps the total batch, so results stay comparable")
    return False, "\n".join(lines)
