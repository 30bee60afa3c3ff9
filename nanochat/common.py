"""Shared plumbing: where artifacts live, which device and dtype to use,
torchrun-aware distributed setup, and rank-aware printing and logging.

`python -m nanochat.common` prints a short report of what was found;
`python -m nanochat.common node0-has PATH`, started by torchrun with one process
per node, prints node 0's answer (yes or no) on every node: how a stage script
makes a decision on files once for all nodes (scripts/common.sh node0_has).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.cpu_memory import keep_freed_memory

DEVICE_TYPES = ("cuda", "mps", "cpu")


class DataError(Exception):
    """Training or evaluation data that is missing, unreachable or malformed; the message names it and
    what to do. Stage scripts print it as one line and exit 2 (any other exception is a bug: traceback)."""


def get_base_dir() -> Path:
    """The folder holding every artifact: data, tokenizer, checkpoints, reports.

    `$NANOCHAT_BASE_DIR` when set, else `~/.cache/nanochat`; created on first use.
    """
    env = os.environ.get("NANOCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"
    base.mkdir(parents=True, exist_ok=True)
    return base


def add_device_arg(group, help_text: str = "override device autodetection (default: cuda, else mps, else cpu)") -> None:
    group.add_argument("--device", default=None, choices=list(DEVICE_TYPES), help=help_text)


def autodetect_device_type(override: str | None = None) -> str:
    """cuda > mps > cpu, unless `override` names one.

    An override naming a device that is not available is an error, not a
    silent fallback: a user who asked for cuda wants to know it is missing.
    """
    choice = (override or "").strip().lower()
    if choice:
        if choice not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {choice!r}; expected one of {', '.join(DEVICE_TYPES)}")
        if not _device_available(choice):
            raise RuntimeError(f"device {choice!r} was requested but is not available on this machine")
        return choice
    for candidate in DEVICE_TYPES:
        if _device_available(candidate):
            return candidate
    return "cpu"


def _device_available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return device_type == "cpu"


def bf16_supported(device_type: str) -> bool:
    """bf16 matmuls run at full speed on CUDA compute capability 8.0 (Ampere) and newer."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


def cpu_bf16_native() -> bool:
    """This CPU runs bf16 matmuls natively, as far as torch.cpu can tell: x86 with
    AVX512-BF16 or AMX tiles (oneDNN uses them). False on every other CPU, Arm's
    BF16 extension included: not measured here, so the safe fp32 answer."""
    try:  # private helpers of torch.cpu; absent on older torch builds
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(device_type: str, requested: str | None = None) -> torch.dtype:
    """The dtype the model computes in: `requested` (a DTYPES name) when given,
    else bf16 where the GPU runs it natively and fp32 everywhere else. On CPU
    bf16 is opt-in: x86 CPUs with AVX512-BF16 or AMX run bf16 matmuls natively,
    older ones emulate them slowly."""
    if requested is not None:
        return DTYPES[requested]
    return torch.bfloat16 if bf16_supported(device_type) else torch.float32


@dataclass(frozen=True)
class DistInfo:
    """What this process is within a (possibly single-process) run."""

    is_distributed: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _torchrun_env() -> tuple[int, int, int] | None:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not all(k in os.environ for k in keys):
        return None
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def compute_init(device_type: str | None = None, seed: int = 42) -> DistInfo:
    """Pick the device, seed torch, and join the process group when under torchrun;
    on CPU, keep freed memory for reuse (nanochat.cpu_memory).

    nccl on CUDA, gloo otherwise. Each CUDA rank takes the GPU of its local rank.
    """
    device_type = autodetect_device_type(device_type)
    if device_type == "cpu":
        keep_freed_memory()
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = _torchrun_env()
    if env is None:
        return DistInfo(False, 0, 0, 1, torch.device(device_type))
    rank, local_rank, world_size = env
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(device_type)
        backend = "gloo"
    if not dist.is_initialized():
        init_kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **init_kwargs)
    return DistInfo(world_size > 1 or dist.is_initialized(), rank, local_rank, world_size, device)


def compute_cleanup(orderly: bool = True) -> None:
    """Leave the process group, if one was joined; safe to call always. `orderly`: after work every rank
    finished, wait for all first (gloo aborts a peer whose connection closes mid-operation). After a failure
    nothing is awaited: the peers may be stuck in a collective this rank never joins, and they stop sooner
    when its connections close (gloo) or torchrun sees it exit."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if orderly:
        dist.barrier()
        dist.destroy_process_group()
    elif dist.get_backend() == "gloo":
        dist.destroy_process_group()  # local for gloo; NCCL's destroy could wait on a collective that never ends


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed, so torchrun output stays readable."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """One line per event: time, rank (when distributed), level, message."""
    rank = get_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("nanochat")
    root.handlers[:] = [handler]
    # Non-master ranks only speak up for warnings, so N ranks don't print N copies.
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    root.propagate = False
    return root


def environment_report() -> dict[str, str]:
    """The facts setup.sh prints at the end and reports embed."""
    device_type = autodetect_device_type()
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"cuda: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), x{torch.cuda.device_count()}"
    elif device_type == "mps":
        device = "mps (Apple GPU)"
    else:
        device = f"cpu ({os.cpu_count()} cores)"
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda or "none (CPU build)",
        "device": device,
        "bf16": "yes" if bf16_supported(device_type) else _cpu_bf16_line(device_type),
        "artifacts": str(get_base_dir()),
    }


def _cpu_bf16_line(device_type: str) -> str:
    if device_type == "cpu" and cpu_bf16_native():
        return "no (fp32 compute; this CPU runs bf16 natively: --dtype bfloat16 asks for it)"
    return "no (fp32 compute)"


def node0_has(path: str) -> bool:
    """Whether `path` exists on rank 0's machine; under torchrun every rank gets rank 0's answer. Over gloo
    whatever the device, so asking needs no GPU."""
    if _torchrun_env() is None:
        return Path(path).exists()
    dist.init_process_group("gloo")
    try:
        answer = [Path(path).exists() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(answer, src=0)
        return bool(answer[0])
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        for key, value in environment_report().items():
            print(f"  {key:<11} {value}")
        return 0
    if len(args) == 2 and args[0] == "node0-has":
        print("yes" if node0_has(args[1]) else "no", flush=True)
        return 0
    print("usage: python -m nanochat.common [node0-has PATH]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
