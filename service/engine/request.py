"""Messages between the frontend and a worker's engine. Plain dataclasses: they cross a process pipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum

from ..structured import ResponseFormat
from .pixels import PixelSource


class FinishReason(StrEnum):
    EOS = "eos"
    LENGTH = "length"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"  # decided by the frontend, which sees text
    CANCELLED = "cancelled"
    ERROR = "error"
    GRAMMAR_COMPLETE = "grammar_complete"  # the response format's language admits nothing more


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
    response_format: ResponseFormat | None = None  # constrains every sampled token

    @property
    def greedy(self) -> bool:
        # Below this a softmax of logits / temperature overflows to inf/NaN: it is argmax anyway.
        return self.temperature < 1e-5


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, already preprocessed: the worker never sees encoded image bytes.

    `key` identifies the content (a hash of the encoded file and num_crops): equal keys mean equal
    embeddings, which the encoder cache and the prefix cache rely on."""

    key: bytes
    num_tokens: int  # positions the image takes in the prompt
    num_tiles: int  # 336-px crops through the vision tower: the global view + the HD sub-crops
    image_size: tuple[int, int]  # (H, W) of the padded HD image
    pixels: PixelSource


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]  # image k (0-based) appears as num_tokens copies of -(k + 1)
    images: tuple[ImageInput, ...]
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
    # Tokens whose KV came from the prefix cache so far, over every (re)admission of the request.
    num_cached_tokens: int = 0
    # Seconds from arrival until the request was first scheduled (set once, on its first output).
    queue_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merged_with(self, later: RequestOutput) -> RequestOutput:
        """This output followed by a later one of the same request, as one output: the later one's
        state (a field added later is carried too), both one's tokens, the first one's timing."""
        return dataclasses.replace(
            later,
            tokens=self.tokens + later.tokens,
            queue_seconds=self.queue_seconds if self.queue_seconds is not None else later.queue_seconds,
        )
