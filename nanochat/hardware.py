"""What the accelerator can do: peak bf16 throughput for MFU, and its name."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks in FLOP/s, matched against torch's device name.
# GB10: published dense bf16 figures disagree (62-125 TFLOP/s); bf16 matmuls were
# measured at 87-98 TFLOP/s on a Spark, so we use a measured 93 TFLOP/s.
PEAK_BF16 = (
    ("GB10", 93e12, "GB10, measured bf16 matmul peak (not the datasheet)"),
    ("H200", 989e12, "H200 dense bf16"),
    ("H100", 989e12, "H100 dense bf16"),
    ("A100", 312e12, "A100 dense bf16"),
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
