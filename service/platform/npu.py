"""Ascend NPUs through torch_npu (an optional extra, imported only here)."""

from __future__ import annotations

import torch

from .base import MemoryInfo, Platform


def import_torch_npu() -> None:
    """Import torch_npu, turning any failure into one line that says what is wrong."""
    try:
        import torch_npu  # noqa: F401  (registers the npu device with torch)
    except Exception as exc:  # an installed but broken torch_npu raises many kinds of errors
        raise RuntimeError(f"torch_npu is installed but cannot be imported: {type(exc).__name__}: {exc}") from None


class NpuPlatform(Platform):
    kind = "npu"

    def configure_process(self, num_threads: int) -> None:
        torch.npu.set_device(self.device)  # type: ignore[attr-defined]
        super().configure_process(num_threads)

    def default_dtype(self) -> torch.dtype:
        # Ascend 910B computes bf16; 910A and 310P do not (fp16 there).
        name = torch.npu.get_device_name(self.device)  # type: ignore[attr-defined]
        return torch.bfloat16 if "910B" in name or "910_9" in name else torch.float16

    def memory_info(self) -> MemoryInfo:
        free, total = torch.npu.mem_get_info(self.device)  # type: ignore[attr-defined]
        return MemoryInfo(free, total)

    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)  # type: ignore[attr-defined]
