"""Per-device-kind policies (see base.Platform): CPU, CUDA, Ascend NPU."""

from __future__ import annotations

import torch

from .base import MemoryInfo, Platform
from .cpu import CpuPlatform
from .cpu_cores import usable_cpus


def platform_for(device: str) -> Platform:
    kind = device.partition(":")[0]
    if kind == "cpu":
        return CpuPlatform(torch.device(device))
    if kind == "cuda":
        from .cuda import CudaPlatform

        return CudaPlatform(torch.device(device))
    if kind == "npu":
        from .npu import NpuPlatform, import_torch_npu

        import_torch_npu()  # torch only knows the "npu" device type once torch_npu registered it
        return NpuPlatform(torch.device(device))
    raise ValueError(f"no platform for device {device!r}")


__all__ = ["CpuPlatform", "MemoryInfo", "Platform", "platform_for", "usable_cpus"]
