"""A request's state inside one worker.

Progress is one number, `num_computed_tokens`, chasing `num_tokens`: prefill, chunked prefill,
decode and recompute after preemption are the same code path with different gaps between the two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import torch

from .request import EngineRequest


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    index: int  # image number in the request (0-based)
    start: int  # first prompt position of its tokens
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def find_image_spans(prompt_ids: tuple[int, ...]) -> list[ImageSpan]:
    spans: list[ImageSpan] = []
    pos = 0
    while pos < len(prompt_ids):
        tid = prompt_ids[pos]
        if tid < 0:
            end = pos
            while end < len(prompt_ids) and prompt_ids[end] == tid:
                end += 1
            spans.append(ImageSpan(index=-tid - 1, start=pos, length=end - pos))
            pos = end
        else:
            pos += 1
    return spans


class Sequence:
    def __init__(self, request: EngineRequest, long_rope_threshold: int) -> None:
        self.request = request
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.prompt_ids)
        self.num_prompt_tokens = len(request.prompt_ids)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.image_spans = find_image_spans(request.prompt_ids)
        # Image embedding rows, computed when a chunk first needs them and dropped once consumed.
        self.image_embeds: dict[int, torch.Tensor] = {}
        # Which LongRoPE factors the cached keys were computed with.
        self.kv_long_rope = False
        self.long_rope_threshold = long_rope_threshold
        self.first_scheduled_time: float | None = None
        self.queue_reported = False
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        if request.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(request.sampling.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def wants_long_rope(self) -> bool:
        # The original picks the factor set from the whole key length of a forward; a sequence's
        # forward always covers all its tokens up to the newest one.
        return self.num_tokens > self.long_rope_threshold

    @property
    def num_remaining(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def mark_scheduled(self) -> None:
        if self.first_scheduled_time is None:
            self.first_scheduled_time = time.time()

    def reset_computation(self) -> None:
        """Forget all computed KV (the caller frees the blocks): the next steps recompute it."""
        self.num_computed_tokens = 0
        self.image_embeds.clear()

    def release_consumed_images(self) -> None:
        for span in self.image_spans:
            if span.end <= self.num_computed_tokens:
                self.image_embeds.pop(span.index, None)
