"""A request's state inside one worker.

Progress is one number, `num_computed_tokens`, chasing `num_tokens`: prefill, chunked prefill,
decode and recompute after preemption are the same code path with different gaps between the two.
Only the engine (and its scheduler) changes a sequence; the model runner only reads it.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass
from enum import Enum
from typing import Any

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


def image_content_key(data: bytes, num_crops: int) -> bytes:
    """The key of an image's embedding: its encoded bytes and the crop budget that shaped it."""
    h = hashlib.blake2b(data, digest_size=16, person=b"vc-image")
    h.update(num_crops.to_bytes(1, "little"))  # the same file at another num_crops is another image
    return h.digest()


def _token_key(image_key: bytes) -> int:
    """A token-like stand-in for every position of an image: negative, so it never equals a token id."""
    return -1 - (int.from_bytes(image_key[:8], "little") >> 2)


def block_hash(parent: bytes, keys: list[int], long_rope: bool) -> bytes:
    """Content hash of a full block and everything before it (the KV of a token depends on its prefix
    and on which LongRoPE factors computed it)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"L" if long_rope else b"S")
    h.update(array("q", keys).tobytes())
    return h.digest()


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
        self._image_token_keys = [_token_key(img.key) for img in request.images]
        # Prefix-cache hashes of this sequence's full blocks, in order (valid for kv_long_rope).
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_cached_tokens = 0  # tokens whose KV came from the prefix cache, every admission counted
        # Images whose encoder-cache entries this sequence holds until its prefill has consumed them.
        self.pinned_images: set[int] = set()
        # Which LongRoPE factors the cached keys were computed with.
        self.kv_long_rope = False
        self.long_rope_threshold = long_rope_threshold
        self.first_scheduled_time: float | None = None
        self.queue_reported = False
        self.num_preemptions = 0
        # The response format's matcher (llguidance), advanced by every token the sequence keeps. A
        # preemption recomputes KV, never tokens, so the matcher's state stays that of the output.
        self.matcher: Any = None
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
        """Forget all computed KV (the caller frees the blocks and the pinned images)."""
        self.num_computed_tokens = 0
        self.block_hashes.clear()
        self.num_registered_blocks = 0

    def _keys(self, lo: int, hi: int) -> list[int]:
        return [t if t >= 0 else self._image_token_keys[-t - 1] for t in self.token_ids[lo:hi]]

    def full_block_hashes(self, num_tokens: int, block_size: int, long_rope: bool) -> list[bytes]:
        """Hashes of the full blocks among the first `num_tokens` tokens (extends `block_hashes`)."""
        while (len(self.block_hashes) + 1) * block_size <= num_tokens:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else b""
            self.block_hashes.append(block_hash(parent, self._keys(i * block_size, (i + 1) * block_size), long_rope))
        return self.block_hashes[: num_tokens // block_size]

    def consumed_images(self) -> list[int]:
        """Pinned images whose every position is computed: their embeddings are no longer needed."""
        return [
            s.index for s in self.image_spans if s.index in self.pinned_images and s.end <= self.num_computed_tokens
        ]
