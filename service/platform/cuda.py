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
        major, _ = torch.cuda.get_device_capability(self.device)
        return torch.bfloat16 if major >= 8 else torch.float16  # Ampere and later compute bf16 natively

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryInfo(free, total)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
