"""CPU: fp32 unless the CPU computes bf16 natively, measured GEMM paths, bounded vision work per step."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .base import Platform
from .cpu_gemm import GemmChoice, apply_gemm_paths

# One engine step's vision work: a CPU encodes a full-size CLIP tile in seconds, so a step holds as
# many tiles as fit this time (at least one), and decoding streams step in between.
VISION_SECONDS_PER_STEP = 0.25


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


class CpuPlatform(Platform):
    kind = "cpu"

    def __init__(self, device: torch.device, flags: set[str] | None = None) -> None:
        super().__init__(device)
        self.flags = cpu_flags() if flags is None else flags
        self._tile_seconds: float | None = None

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if native_bf16(self.flags) else torch.float32

    def prepare_model(self, model, rows: dict[str, int], policy: str) -> list[GemmChoice]:  # type: ignore[no-untyped-def]
        try:
            choices = apply_gemm_paths(model, linear_role, rows, policy)
        except RuntimeError as exc:
            raise ValueError(f"--cpu-gemm {policy}: not available for {model.dtype} on this CPU ({exc})") from exc
        self._tile_seconds = self._time_one_tile(model)
        return choices

    @staticmethod
    def _time_one_tile(model) -> float:  # type: ignore[no-untyped-def]
        tile = torch.zeros(1, 3, 336, 336)
        with torch.inference_mode():
            model.vision.crop_features(tile, 1)  # first call pays one-off set-up costs
            start = time.perf_counter()
            model.vision.crop_features(tile, 1)
        return time.perf_counter() - start

    def vision_tiles_per_step(self, configured: int) -> int:
        if configured > 0:
            return configured
        if not self._tile_seconds:
            return 1
        return max(1, int(VISION_SECONDS_PER_STEP / self._tile_seconds))
