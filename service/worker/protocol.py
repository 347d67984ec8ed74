"""The narrow IPC boundary between the frontend and a worker process.

Frontend -> worker: AddRequest, AbortRequest, Shutdown. Worker -> frontend: WorkerReady once, then
one StepReport per engine step (all outputs of that step, never one message per token), and
Rejected for a request the engine refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ServerConfig
from ..engine import EngineRequest, EngineStats, RequestOutput


@dataclass(frozen=True)
class WorkerSettings:
    """One worker's start-up: the server's configuration plus what the frontend resolved for it."""

    index: int
    device: str
    model_dir: str  # the embedded default model's folder when --model is empty
    max_model_len: int  # --max-context-tokens, or the model's context length
    num_threads: int
    config: ServerConfig


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
    load_seconds: float
    pid: int


@dataclass(frozen=True)
class Rejected:
    request_id: str
    limit: str
    message: str


@dataclass(frozen=True)
class StepMetrics:
    seconds: float
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    vision_seconds: float
    num_images_encoded: int


@dataclass
class StepReport:
    outputs: list[RequestOutput]
    stats: EngineStats
    step: StepMetrics | None = None
    aborted: list[str] = field(default_factory=list)
