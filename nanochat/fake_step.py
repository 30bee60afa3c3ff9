"""Training steps run to measure their memory, on fake tensors or real ones.

`measure_fake_step(config, batch, seq_len, dtype, stage)` builds the model and
its optimizers inside PyTorch's FakeTensorMode, where a tensor has a shape,
a dtype and a device but no storage, and runs training steps under
MemTracker (torch.distributed._tools), which adds up every tensor's bytes as
it is made and freed, by kind. Nothing is allocated, so a step needing
100 GiB is measured on a laptop in seconds; this is how torchtitan estimates
memory. `track_training_peak` runs the same steps on any model, so a test can
check the fake measurement against real tensors.

What runs: two optimizer steps, each ending in zero_grad(set_to_none=True).
The first creates the optimizer state (AdamW's moments and Muon's momentum
appear in the first step()); the second accumulates two micro-batches, so
the first one's gradients are held while the second runs forward, as in any
run with gradient accumulation (a Spark at depth 20 accumulates 8). Without
accumulation the real peak is lower by up to the gradients' size.

Returned: bytes by part at the moment of the peak, one rank, no overhead:
parameters, gradients, optimizer, activations (tensors made in forward and
still alive: what autograd saved, plus forward's working tensors at that
moment), temporaries (backward's working tensors, plus the batch and the
rotary tables, which are neither and small).

Imported lazily by nanochat.memory: MemTracker pulls in 1.3 s of
torch.distributed modules that the memory readers do not need.
"""

from __future__ import annotations

import inspect
import itertools

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

from nanochat import ops
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers

# The only device that can be faked without its hardware: CUDA kernels choose
# their algorithms by asking the GPU. Shapes and dtypes, hence the model's
# tensors, are the same on every device.
MEASURE_DEVICE = torch.device("cpu")
# Micro-batches of each measured optimizer step (see the module doc).
MICRO_BATCHES_PER_STEP = (1, 2)
TENSOR_PARTS = ("parameters", "gradients", "optimizer", "activations", "temporaries")
# MemTracker's kinds of tensor -> our parts. A kind a later torch adds counts
# as temporaries, so the parts still add up to MemTracker's total.
PART_OF_KIND = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.BUFFER: "temporaries",  # the rotary tables
    _MemRefType.OTH: "temporaries",  # the batch, tracked as external tensors
}


class PeakTracker(MemTracker):
    """MemTracker keeping only the overall peak.

    MemTracker's own _update_peak_stats also updates the peak of every module
    after every op: two thirds of the measuring time at depth 20, for
    per-module figures not used here. It is a private method: should a
    later torch rename it, this override goes unused and measuring is slower.
    """

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if snapshot[_TOTAL_KEY] > self._peak_mem.get(device, 0):
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)


def training_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, stage: str) -> torch.Tensor:
    """The scalar loss a stage backpropagates: the mean token loss; for RL the
    per-token weighted loss (weights are the advantages there) where the model
    takes weights, the mean loss otherwise."""
    if stage == "rl" and "loss_weights" in inspect.signature(model.forward).parameters:
        weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
        return model(inputs, targets, loss_weights=weights)
    return model(inputs, targets)


def _parts_of(peak: dict) -> dict[str, int]:
    parts = dict.fromkeys(TENSOR_PARTS, 0)
    for snapshot in peak.values():  # one entry per device; there is one device
        for kind, size in snapshot.items():
            if kind != _TOTAL_KEY:
                parts[PART_OF_KIND.get(kind, "temporaries")] += size
    return parts


def track_training_peak(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], device_batch_size: int,
                        seq_len: int, stage: str = "base") -> dict[str, int]:
    """Peak bytes by part of the measured steps (module doc) of `model` and
    `optimizers`, fake or real. Call inside the FakeTensorMode that made them
    if they are fake: MemTracker only counts tensors of the fake mode active
    when it starts."""
    device = next(model.parameters()).device
    # token 0 is a valid input and target for every vocabulary; values do not change memory
    inputs = torch.zeros(device_batch_size, seq_len, dtype=torch.long, device=device)
    targets = torch.zeros_like(inputs)
    tracker = PeakTracker()
    tracker.track_external(model, *optimizers, inputs, targets)
    with tracker:
        for micro_batches in MICRO_BATCHES_PER_STEP:
            for _ in range(micro_batches):
                tracker.reset_mod_stats()  # MemTracker refuses a second forward of the root module otherwise
                training_loss(model, inputs, targets, stage).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
    return _parts_of(tracker.get_tracker_snapshot("peak"))


def materialise_fake(model: torch.nn.Module) -> None:
    """Give a meta-device model fake storage and initialise it, inside a FakeTensorMode.

    build_model(config, "cpu") cannot run inside the mode: GPT(config) then
    makes FakeTensor parameters, nn.Parameter's detach() puts each in the
    mode's tensor memo (a weak reference), and Module.to_empty swaps FakeTensor
    parameters with torch.utils.swap_tensors, which refuses tensors that have
    weak references. So the model is laid out on the meta device outside the
    mode and materialised here, as build_model does on a real device.
    """
    model.to_empty(device=MEASURE_DEVICE)
    model.init_weights()  # also remakes the rotary tables, as fake tensors
    real = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if not isinstance(t, FakeTensor)]
    if real:
        raise RuntimeError(f"{', '.join(real)} would be really allocated: not fake after to_empty under FakeTensorMode")


def measure_fake_step(config: GPTConfig, device_batch_size: int, seq_len: int, dtype: torch.dtype,
                      stage: str = "base", checkpoint_blocks: bool = False) -> dict[str, int]:
    """Peak bytes by part of the measured steps, one rank, on fake tensors: nothing is allocated."""
    model = build_model(config, "meta")  # outside the mode: see materialise_fake
    # Non-fake inputs are allowed only so that to_empty can read the meta
    # tensors' shapes; materialise_fake checks that nothing real is left.
    # The head chunked as on a GPU: these fake tensors live on the CPU, whose chunks are
    # capped (ops.CPU_HEAD_CHUNK_ELEMENTS), but the estimate plans GPU runs. For a CPU run
    # it errs on the safe side, by at most two chunks of the GPU's size.
    with FakeTensorMode(allow_non_fake_inputs=True), ops.head_chunk_elements(cpu=ops.HEAD_CHUNK_ELEMENTS):
        materialise_fake(model)
        # as training sets them up (runtime.prepare_model): no autocast, the model casts itself
        model.compute_dtype, model.checkpoint_blocks = dtype, checkpoint_blocks
        # learning rates do not change memory: build_optimizers' defaults
        optimizers = build_optimizers(model, world_size=1)
        return track_training_peak(model, optimizers, device_batch_size, seq_len, stage)
