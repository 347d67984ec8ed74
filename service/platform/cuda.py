"""CUDA GPUs: bf16 where the GPU computes it natively, fp16 otherwise; device memory for the KV pool."""

from __future__ import annotations

import torch

from .base import MemoryInfo, Platform


class CudaPlatform(Platform):
    kind = "cuda"

    def configure_process(self, num_threads: int) -> None:
        # Select the device before anything touches CUDA: otherwise every worker opens a context on GPU 0.
        torch.cuda.set_device(self.device)
        # fp32 parity with the reference needs true fp32 matmuls (TF32 rounds inputs to 10 bits).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        super().configure_process(num_threads)

    def default_dtype(self) -> torch.dtype:
        # bf16 only where the GPU computes it (Ampere, compute capability 8.0, and later): V100 and T4
        # emulate it, slowly, and is_bf16_supported() says True there unless asked not to count that.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryInfo(free, total)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def allocated_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        # Pinned host memory lets the copy run asynchronously, behind the work already queued.
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
