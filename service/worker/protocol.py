"""The narrow IPC boundary between the frontend and a worker process.

Frontend -> worker: AddRequest, AbortRequest, Shutdown. Worker -> frontend: WorkerReady once, then
one StepReport per engine step (all outputs of that step, never one message per token), and
Rejected for a request the engine refused. Image pixels never cross this pipe (engine.pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import EngineConfig, EngineRequest, EngineStats, RequestOutput, StepTimings


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one worker process needs to start, and nothing of the frontend's configuration."""

    index: int
    device: str
    model_dir: str
    dtype: str  # auto | float32 | bfloat16 | float16
    num_threads: int
    attention_backend: str
    attention_workspace: int  # bytes
    cpu_gemm: str  # auto | dense | onednn
    # The engine's limits; kv_cache_memory_bytes is --kv-cache-memory, replaced by the profiled budget
    # when kv_cache_fraction > 0 on an accelerator, and vision_tiles_per_step 0 means the platform's choice.
    engine: EngineConfig
    kv_cache_fraction: float
    log_format: str
    log_level: str

    @property
    def name(self) -> str:
        return f"worker{self.index}"


@dataclass(frozen=True)
class AddRequest:
    request: EngineRequest


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class WorkerReady:
    device: str
    dtype: str
    attention_backend: str
    stats: EngineStats
    engine: EngineConfig  # as the worker resolved it (KV bytes, vision tiles per step)
    load_seconds: float
    pid: int


@dataclass(frozen=True)
class Rejected:
    request_id: str
    limit: str
    message: str


@dataclass(frozen=True)
class StepReport:
    outputs: list[RequestOutput]
    stats: EngineStats
    timings: StepTimings | None = None  # None: a report of cancellations only, no step ran
    seconds: float = 0.0  # wall time of the whole step (schedule, model, apply)
    image_decodes: int = 0  # images this process has ever decoded: stays 0 (preprocessing does it)
