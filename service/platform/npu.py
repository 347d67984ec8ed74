"""Ascend NPUs through torch_npu (an optional extra, imported only here)."""

from __future__ import annotations

import torch

from .base import MemoryInfo, Platform


def import_torch_npu() -> None:
    """Import torch_npu, turning any failure into one line that says what is wrong."""
    try:
        import torch_npu  # noqa: F401  (registers the npu device with torch)
    except Exception as exc:  # an installed but broken torch_npu raises many kinds of errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"torch_npu is installed but cannot be imported ({type(exc).__name__}: {first})") from None


def npu_has_bf16(device_name: str) -> bool:
    """From torch.npu.get_device_name(): Ascend910B1..B4 and Ascend910_93xx compute bf16."""
    return device_name.startswith(("Ascend910B", "Ascend910_9"))


class NpuPlatform(Platform):
    kind = "npu"

    def configure_process(self, num_threads: int) -> None:
        torch.npu.set_device(self.device)  # type: ignore[attr-defined]
        super().configure_process(num_threads)

    def default_dtype(self) -> torch.dtype:
        # Ascend 910B and 910_93 compute bf16; 910A/ProA/ProB and 310P do not (fp16 there).
        return torch.bfloat16 if npu_has_bf16(torch.npu.get_device_name(self.device)) else torch.float16  # type: ignore[attr-defined]

    def memory_info(self) -> MemoryInfo:
        free, total = torch.npu.mem_get_info(self.device)  # type: ignore[attr-defined]
        return MemoryInfo(free, total)

    def reset_peak(self) -> None:
        torch.npu.reset_peak_memory_stats(self.device)  # type: ignore[attr-defined]

    def peak_bytes(self) -> int:
        return int(torch.npu.max_memory_allocated(self.device))  # type: ignore[attr-defined]

    def allocated_bytes(self) -> int:
        return int(torch.npu.memory_allocated(self.device))  # type: ignore[attr-defined]

    def empty_cache(self) -> None:
        torch.npu.empty_cache()  # type: ignore[attr-defined]

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)  # type: ignore[attr-defined]
