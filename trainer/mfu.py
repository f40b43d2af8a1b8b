"""Model FLOPs utilisation: achieved training FLOP/s against the device's peak.

FLOPs per token come from `Phi.flops_per_token` (6N plus attention). Peaks: dense bf16 tensor-core
figures from the vendors' datasheets for known GPUs. On CPU the trainer reports tokens per second
and no MFU: the only peak there is a measured matmul rate (`cpu_peak`), and on a shared machine
that probe swings with the neighbours' load (86% MFU on one run, 44-51% on the next, on 2 cores).
"""

from __future__ import annotations

import time
from functools import cache

import torch

# Dense (no sparsity) peak FLOP/s, bf16 / fp16 tensor cores.
GPU_PEAK_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,  # unknown H100 variant: the lower figure
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def gpu_peak(name: str) -> float | None:
    """Peak bf16 FLOP/s for a CUDA device name, or None when unknown (most specific match)."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_BF16[key]
    return None


@cache
def cpu_peak(n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on this CPU with torch's current thread count (best of reps)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(device: torch.device) -> float | None:
    """The peak MFU is measured against: a known GPU's datasheet figure; None on CPU (and on an
    unknown GPU), where the trainer reports tokens per second alone."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return None
