"""Messages between the frontend and a worker's engine. Plain dataclasses: they cross a process pipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"  # decided by the frontend, which sees text
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Tokens that end generation: the stop ids of the request plus, unless ignore_eos, the model's EOS ids.
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    logprobs: int = 0

    @property
    def greedy(self) -> bool:
        # Below this a softmax of logits / temperature overflows to inf/NaN: it is argmax anyway.
        return self.temperature < 1e-5


@dataclass(frozen=True)
class ImagePayload:
    data: bytes  # the encoded file, decoded again in the worker where the pixels are needed
    num_crops: int
    num_tokens: int


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]  # image k (0-based) appears as num_tokens copies of -(k + 1)
    images: tuple[ImagePayload, ...]
    sampling: SamplingOptions
    arrival_time: float  # time.time() at the frontend


@dataclass(frozen=True)
class TokenOutput:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    tokens: list[TokenOutput] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Seconds from arrival until the request was first scheduled (set once, on its first output).
    queue_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
