"""CPU: fp32 unless the CPU computes bf16 natively, measured GEMM paths, one thread for per-token
work and all of the worker's threads for big work, bounded vision work per step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .base import Platform
from .cpu_gemm import Threads, WideAbove, apply_gemm_paths

# One engine step's vision work: a CPU encodes a full-size CLIP tile in seconds, so a step holds as
# many tiles as fit this time (at least one), and decoding streams step in between.
VISION_SECONDS_PER_STEP = 0.25
# A decoder layer runs on all threads from this many tokens in the step (prefill chunks).
WIDE_STEP_TOKENS = 256
# OpenMP threads that finish a parallel region sleep at once instead of spinning: a worker's
# second thread is busy only inside big GEMMs, and spinning in between would take the core that
# the frontend and the preprocessing need. Read by libgomp when a worker process loads torch.
OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str]) -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX): only then is bf16 faster than fp32 here."""
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def linear_role(name: str) -> str:
    if name == "lm_head":
        return "lm_head"
    if ".img_projection." in f".{name}":
        return "projector"
    if ".vision_embed_tokens." in f".{name}":
        return "vision"
    return "decoder"


def set_openmp_environment() -> None:
    """Give worker processes started from now on the CPU platform's OpenMP settings (an operator's
    own values win)."""
    for key, value in OPENMP_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


class CpuPlatform(Platform):
    kind = "cpu"

    def __init__(self, device: torch.device, flags: set[str] | None = None) -> None:
        super().__init__(device)
        self.flags = cpu_flags() if flags is None else flags
        self.threads = Threads()
        self._tile_seconds: float | None = None

    def configure_process(self, num_threads: int) -> None:
        self.threads = Threads(narrow=1, wide=max(1, num_threads))
        torch.set_num_threads(self.threads.narrow)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if native_bf16(self.flags) else torch.float32

    def prepare_model(self, model: Any, rows: dict[str, int], policy: str) -> list[Any]:
        try:
            choices = apply_gemm_paths(model, linear_role, rows, self.threads, policy)
        except RuntimeError as exc:
            raise ValueError(f"--cpu-gemm {policy}: not available for {model.dtype} on this CPU ({exc})") from exc
        vision = model.vision
        vision.img_processor = WideAbove(vision.img_processor, 1, self.threads)
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = WideAbove(layer, WIDE_STEP_TOKENS, self.threads)
        return choices

    def measured_tile_seconds(self, seconds: float) -> None:
        """The warm-up's vision time per tile, which sizes the vision work of a step."""
        self._tile_seconds = seconds

    def vision_tiles_per_step(self, configured: int) -> int:
        if configured > 0:
            return configured
        if not self._tile_seconds:
            return 1
        return max(1, int(VISION_SECONDS_PER_STEP / self._tile_seconds))
