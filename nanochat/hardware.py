"""What the accelerator can do: peak bf16 throughput for MFU, and its name."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, the figure MFU is
# conventionally measured against, keyed by the exact name torch reports.
# Exact, because the variants of one chip differ: an "NVIDIA H100 NVL" or
# "NVIDIA H100 PCIe" matched as "H100" would take the SXM peak and read low.
# A name not here gets no peak (MFU n/a), never a neighbour's. NVIDIA's
# datasheets quote bf16 "with sparsity", at twice the dense rate; each figure
# below is that quote / 2:
#   H100 SXM 1,979 and H100 PCIe 1,513: NVIDIA H100 Tensor Core GPU datasheet;
#   H100 NVL 1,671: NVIDIA H100 NVL datasheet (per GPU);
#   H200 SXM 1,979 and H200 NVL 1,671: NVIDIA H200 product page (same GH100 compute as the H100 SXM / NVL);
#   GH200 1,979: NVIDIA GH200 Grace Hopper Superchip datasheet (an H100 SXM-class GPU);
#   A100 (SXM4 and PCIe) 624: NVIDIA A100 datasheet.
#
# GB10 (DGX Spark): NVIDIA publishes no bf16 figure; the datasheet gives "up
# to 1 PFLOP" of FP4 with sparsity. 125 = 1000 (FP4, sparse) / 2 (dense) / 2
# (FP4 -> FP8) / 2 (FP8 -> bf16) is the dense tensor-core ceiling that ratio
# implies, derived and not measured, and so labelled wherever it is printed
# until a measured matmul rate replaces it. Published bf16 figures we could
# trace run from ~100 TFLOP/s (hardware databases, quoted in the review of
# huggingface.js PR #2117) to this 125; if GB10's bf16 runs slower than the
# ratio, MFU on a Spark reads low, not high. One user's CUTLASS runs on a Spark
# (356 TFLOP/s dense NVFP4, 188 FP8; forums.developer.nvidia.com/t/359960) sit
# under the 500 and 250 dense FP4/FP8 ceilings of the same arithmetic.
GB10_DERIVED = "DERIVED, not measured: GB10 1 PFLOP/s FP4 with sparsity (DGX Spark datasheet) / 8 = 125 TFLOP/s dense bf16"
PEAK_BF16: dict[str, tuple[float, str]] = {
    "NVIDIA GB10": (125e12, GB10_DERIVED),
    "NVIDIA H100 80GB HBM3": (989e12, "H100 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    "NVIDIA H100 PCIe": (756e12, "H100 PCIe: 756 TFLOP/s dense bf16 (datasheet 1,513 with sparsity)"),
    "NVIDIA H100 NVL": (835e12, "H100 NVL: 835 TFLOP/s dense bf16 (datasheet 1,671 with sparsity)"),
    "NVIDIA H200": (989e12, "H200 SXM: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    "NVIDIA H200 NVL": (835e12, "H200 NVL: 835 TFLOP/s dense bf16 (datasheet 1,671 with sparsity)"),
    "NVIDIA GH200 480GB": (989e12, "GH200: 989 TFLOP/s dense bf16 (datasheet 1,979 with sparsity)"),
    "NVIDIA A100-SXM4-80GB": (312e12, "A100 SXM4: 312 TFLOP/s dense bf16 (datasheet 624 with sparsity)"),
    "NVIDIA A100-SXM4-40GB": (312e12, "A100 SXM4: 312 TFLOP/s dense bf16 (datasheet 624 with sparsity)"),
    "NVIDIA A100 80GB PCIe": (312e12, "A100 PCIe: 312 TFLOP/s dense bf16 (datasheet 624 with sparsity)"),
    "NVIDIA A100-PCIE-40GB": (312e12, "A100 PCIe: 312 TFLOP/s dense bf16 (datasheet 624 with sparsity)"),
}


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
    name = device_name(device).strip()
    if name not in PEAK_BF16:
        return None, f"unknown peak for {name!r}: add its dense bf16 datasheet figure to nanochat.hardware.PEAK_BF16"
    return PEAK_BF16[name]
