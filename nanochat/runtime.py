"""How a stage runs the model: its compute dtype and whether it is compiled.

Every training stage and evaluation takes the same flags (add_compute_args),
passes their values as a ComputeSettings, and gets a model set up the same way
(prepare_model). Its device batch is fitted in memory before step 1, the same on
every rank (fit_device_batch).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import DTYPES, compute_dtype, print0
from nanochat.memory import available_memory, choose_device_batch, measure_training_memory

# torch.compile costs about a minute of compilation on a 2-core CPU at depth 4
# and then saves ~17% of each step (bench/README.md), so on CPU it pays only
# for runs of at least this many steps; on CUDA it always pays.
CPU_COMPILE_MIN_STEPS = 500
# Variable-length batches (SFT, RL, CORE) are padded up to one of these row
# lengths, so a compiled model sees a handful of shapes instead of a new one
# (and a recompilation) at nearly every step.
MIN_BUCKET = 64
# What compile_model compiles with; tests swap in "aot_eager" (the same graphs, no kernels generated).
COMPILE_BACKEND = "inductor"
# Graphs a compiled model needs per row width: a training step and an evaluation
# pass (no gradients, per-token losses), or CORE's continuation losses and greedy logits.
GRAPH_KINDS = 2


def add_dtype_arg(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    group.add_argument("--dtype", default=None, choices=list(DTYPES),
                       help="compute dtype; weights stay float32 (default: bfloat16 on a GPU that runs it natively, "
                            "float32 elsewhere; bfloat16 is fast on CPUs with AVX512-BF16 or AMX)")


def add_compute_args(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--dtype and --compile / --no-compile."""
    add_dtype_arg(group)
    group.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                       help=f"torch.compile the model (auto: on CUDA, and on CPU for runs of {CPU_COMPILE_MIN_STEPS}+ steps)")
    group.add_argument("--no-compile", dest="compile", action="store_const", const="no", help="same as --compile no")
    group.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each block in backward instead of keeping its activations: about a third more "
                            "matmul FLOPs, for models that do not fit otherwise")


@dataclass(frozen=True)
class ComputeSettings:
    """The values of add_compute_args' flags."""

    dtype: str | None = None  # None: the device's natural compute dtype (common.compute_dtype)
    compile: str = "auto"  # auto / yes / no
    activation_checkpointing: bool = False


def wants_compile(choice: str, device_type: str, num_steps: int | None = None) -> bool:
    if choice != "auto":
        return choice == "yes"
    return device_type == "cuda" or (num_steps is not None and num_steps >= CPU_COMPILE_MIN_STEPS)


def prepare_model(model, compute: ComputeSettings, device: torch.device, num_steps: int | None = None):
    """Set the model's compute dtype; return what to call for steps: the model
    compiled (per compute.compile) or the model itself."""
    set_compute_dtype(model, compute.dtype, device)
    model.checkpoint_blocks = compute.activation_checkpointing
    compiled = wants_compile(compute.compile, device.type, num_steps)
    print0(f"compute dtype {str(model.compute_dtype).removeprefix('torch.')}; torch.compile {'on' if compiled else 'off'}")
    return compile_model(model, model.config.sequence_len) if compiled else model


def set_compute_dtype(model, dtype: str | None, device: torch.device) -> None:
    """The model computes in `dtype` (None: the device's natural one); its weights stay as they are."""
    model.compute_dtype = compute_dtype(device.type, dtype)


def bucket_length(length: int, limit: int) -> int:
    """The row length to pad `length` tokens to: the next power of two (at least
    MIN_BUCKET), never past `limit`."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, limit))


def bucket_widths(limit: int) -> list[int]:
    """Every width bucket_length gives rows of at most `limit` tokens."""
    widths, bucket = [], MIN_BUCKET
    while bucket < limit:
        widths.append(bucket)
        bucket *= 2
    return widths + [limit]


class RecompileLimitError(RuntimeError):
    """A compiled model met more input shapes than compile_model allowed it."""


def compile_model(model, max_len: int):
    """`model` compiled with static shapes (faster kernels than dynamic ones, and the
    head's chunk loop in nanochat.ops specializes the row length anyway), allowed
    GRAPH_KINDS graphs per bucket width up to max_len. One graph more raises
    RecompileLimitError: dynamo's own answer past its recompile limit (8 by default)
    is to run every new shape eagerly without a word."""
    widths = bucket_widths(max_len)
    graphs = GRAPH_KINDS * len(widths)
    # the limit counts the entries of the code object, whichever model made them (a budget
    # run's probes at other depths, earlier stages run in the same process)
    limit = _cached_graphs(type(model).forward) + graphs
    print0(f"torch.compile: at most {graphs} graphs ({GRAPH_KINDS} kinds x row widths {', '.join(map(str, widths))})")
    compiled = torch.compile(model, dynamic=False, backend=COMPILE_BACKEND)
    run = compiled.forward

    def forward(*args, **kwargs):
        # patched per call, so other compiled code in the process keeps dynamo's defaults
        with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            try:
                return run(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
                raise RecompileLimitError(
                    f"the compiled model met a new input shape after its {graphs} graphs: a caller passes rows that are "
                    f"not padded to runtime.bucket_length (up to {max_len}) or a batch of another row count; "
                    "TORCH_LOGS=recompiles names the shapes, and --no-compile runs uncompiled meanwhile") from exc

    compiled.forward = forward
    return compiled


def _cached_graphs(function) -> int:
    """Graphs dynamo holds for `function` (a private helper of torch._dynamo, there since torch 2.1; should a
    torch drop it, 0: the budget then counts this model's graphs only, rather than every run failing here)."""
    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    return len(entries(function.__code__)) if entries is not None else 0


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back before an evaluation, so its
    (differently shaped) allocations do not stack a second peak on top of
    what training left cached."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- will the batch fit


class MemoryRefusal(RuntimeError):
    """The measured step does not fit and the user did not let the stage pick a smaller batch."""


def add_memory_args(group) -> None:
    group.add_argument("--auto-batch", action="store_true",
                       help="when the device batch given does not fit, use the largest power of two dividing it that "
                            "does (gradient accumulation keeps the tokens per optimizer step); the default batch always is")
    group.add_argument("--ignore-memory-check", action="store_true",
                       help="start even when the measured step does not fit in the available memory")
    group.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                       help="plan for at most this many GiB, e.g. to leave room for other jobs on a shared machine "
                            "(default: what the device has available)")


@dataclass(frozen=True)
class BatchRequest:
    """What a stage asks of its device batch: its default and the values of --device-batch-size and add_memory_args' flags."""

    default: int  # the stage's batch when memory allows
    given: int | None = None  # --device-batch-size: refused when it does not fit, unless one of the next two
    auto_batch: bool = False
    ignore_memory_check: bool = False
    memory_limit_gib: float | None = None


def _memory_to_plan_for(limit_gib: float | None, device: torch.device) -> tuple[int | None, str]:
    free, source = available_memory(device)
    if limit_gib is None:
        return free, source
    limit = int(limit_gib * 2**30)
    if free is not None and free < limit:
        return free, f"{source}, under --memory-limit {limit_gib:g} GiB"
    return limit, f"--memory-limit {limit_gib:g} GiB"


def fit_device_batch(model, request: BatchRequest, seq_len: int, info, stage: str, *,
                     checkpoint_blocks: bool = False) -> tuple[int, int]:
    """(the device batch to train with, its measured peak in bytes), decided before step 1 from the training
    step measured on fake tensors (nanochat.memory) against the memory this device has. No batch given means
    the default or the largest power of two below it that fits; a batch given is refused when it does not
    fit, unless auto_batch or ignore_memory_check. Every rank takes the smallest batch any rank chose (and
    refuses when any rank refuses): ranks that disagree would split the optimizer step differently and wait
    at different collectives."""
    chosen = _batch_this_rank_fits(model, request, seq_len, info, stage, checkpoint_blocks)
    agreed = smallest_over_ranks(chosen or 0, info)
    if agreed == 0:
        raise MemoryRefusal("refusing to start: the step does not fit" + (" on every rank" if info.world_size > 1 else "")
                            + " (--auto-batch picks a batch that does; --ignore-memory-check starts anyway)")
    if agreed != chosen:
        print0(f"device batch {agreed}: the largest that fits on every rank")
    estimate = measure_training_memory(model.config, agreed, seq_len, model.compute_dtype, info.world_size, stage,
                                       checkpoint_blocks=checkpoint_blocks)  # cached: measured already while choosing
    return agreed, estimate.total


def _batch_this_rank_fits(model, request: BatchRequest, seq_len: int, info, stage: str, checkpoint_blocks: bool) -> int | None:
    """The device batch this rank's memory allows under the request, or None for a refusal; says why."""
    requested = request.given or request.default
    chosen, lines = choose_device_batch(model.config, requested, seq_len, model.compute_dtype, info.world_size,
                                        _memory_to_plan_for(request.memory_limit_gib, info.device), stage,
                                        checkpoint_blocks=checkpoint_blocks)
    for line in lines:
        print0(line)
    if chosen == requested:
        return requested
    if request.ignore_memory_check:
        print0(f"--ignore-memory-check: starting at device batch {requested} anyway")
        return requested
    if chosen is None or not (request.given is None or request.auto_batch):
        return None
    why = "--auto-batch" if request.auto_batch else f"the default {request.default} does not fit"
    print0(f"device batch {chosen} ({why}); gradient accumulation keeps the tokens per optimizer step")
    return chosen


def smallest_over_ranks(value: int, info) -> int:
    """The smallest `value` over all ranks (all-reduce MIN)."""
    if info.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
