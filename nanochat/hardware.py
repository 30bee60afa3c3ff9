"""What the accelerator can do: peak bf16 throughput for MFU, and its name."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, the figure MFU is
# conventionally measured against, matched against torch's device name in
# this order (the first key found in the name wins, so "H100 PCIe" comes
# before "H100"). NVIDIA's datasheets also quote bf16 "with sparsity", at
# twice the dense rate; these are the dense figures.
#
# GB10 (DGX Spark): NVIDIA publishes no bf16 figure; the datasheet gives "up
# to 1 PFLOP" of FP4 with sparsity. Published bf16/fp16 figures disagree: the
# ones we could trace run from ~100 TFLOP/s (hardware databases, as quoted in
# the review of huggingface.js PR #2117) to the 125 below, and this table used
# to hold a "measured" 93 that had no source. We use 125 = 1000 (FP4, sparse)
# / 2 (dense) / 2 (FP4 -> FP8) / 2 (FP8 -> bf16), 1/8 of the headline, because
# it is the same kind of figure as the others here: the dense tensor-core
# ceiling implied by the datasheet, not a measured matmul rate. Unchecked: if
# GB10's bf16 runs slower than that ratio, MFU on a Spark reads low, not high.
# One user's CUTLASS runs on a Spark (356 TFLOP/s dense NVFP4, 188 FP8;
# forums.developer.nvidia.com/t/359960) sit under the 500 and 250 dense
# FP4/FP8 ceilings of the same arithmetic.
PEAK_BF16 = (
    ("GB10", 125e12, "GB10: 1 PFLOP/s FP4 with sparsity (DGX Spark datasheet) / 8 = 125 TFLOP/s dense bf16, derived, not published"),
    ("H200", 989e12, "H200 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity; same compute as H100 SXM)"),
    ("H100 PCIe", 756e12, "H100 PCIe: 756 TFLOP/s dense bf16 (datasheet 1,513 with sparsity)"),
    ("H100", 989e12, "H100 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    ("A100", 312e12, "A100: 312 TFLOP/s dense bf16 (datasheet)"),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from); None when unknown, so MFU reads n/a, never 0."""
    if device.type != "cuda":
        return None, f"no MFU on {device.type}"
    if dtype != torch.bfloat16:
        return None, "no MFU outside bf16"
    name = device_name(device)
    for key, flops, source in PEAK_BF16:
        if key in name:
            return flops, source
    return None, f"unknown peak for {name!r}"
