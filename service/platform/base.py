"""What differs between device kinds, behind one interface the worker, engine and model ask.

A platform owns: the process set-up (device selection, threads, numerics switches), the default
compute dtype, the matmul path of the model's Linears, the attention backend (and with it the KV
layout), how much vision work one engine step may do, and device-memory facts for sizing the KV
pool. Model, engine and worker code hold no device `if`s of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..model.attention import AttentionBackend, select_attention_backend


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int


class Platform:
    kind = "base"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    # --- process -------------------------------------------------------------------------------

    def configure_process(self, num_threads: int) -> None:
        """Called first in a worker process, before any tensor is made."""
        torch.set_num_threads(max(1, num_threads))

    # --- numerics ------------------------------------------------------------------------------

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def resolve_dtype(self, name: str) -> torch.dtype:
        from ..model.loader import DTYPES, CheckpointError

        if name == "auto":
            return self.default_dtype()
        if name not in DTYPES:
            raise CheckpointError(f"--dtype {name!r} is not supported; choose from auto, {', '.join(DTYPES)}")
        return DTYPES[name]

    # --- model ---------------------------------------------------------------------------------

    def prepare_model(self, model: Any, rows: dict[str, int], policy: str) -> list[Any]:
        """Give the model's matmuls this device's fast path (after loading, before warm-up).
        Returns what was decided, for the worker's log."""
        return []

    def attention_backend(self, name: str, workspace_bytes: int) -> AttentionBackend:
        return select_attention_backend(name, self.device, workspace_bytes)

    def measured_tile_seconds(self, seconds: float) -> None:
        """The warm-up's vision time per tile (platforms that size vision work by time use it)."""

    def vision_tiles_per_step(self, configured: int) -> int:
        """Vision-tower tiles one engine step may encode (0 in the flag = this platform's choice)."""
        return configured if configured > 0 else 64

    # --- memory --------------------------------------------------------------------------------

    def memory_info(self) -> MemoryInfo | None:
        """Device memory, or None where the KV pool is sized from --kv-cache-memory only (CPU)."""
        return None

    def reset_peak(self) -> None:
        """Start measuring the peak of allocated device memory anew."""

    def peak_bytes(self) -> int:
        return 0

    def allocated_bytes(self) -> int:
        return 0

    def empty_cache(self) -> None:
        """Give cached, unused device memory back (after an out-of-memory error, after profiling)."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` says the device ran out of memory (then the step is retried with less)."""
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        text = str(exc).lower()
        return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor of step inputs on the device (accelerators: pinned, without blocking)."""
        return tensor.to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        pass
