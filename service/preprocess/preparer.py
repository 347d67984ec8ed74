"""From a validated call to a prepared prompt: cheap checks on the event loop, heavy work in the pool.

Order matters: everything that can refuse a request from sizes alone runs first, on the event loop,
in microseconds (image headers, a lower bound on the text's tokens, budgets); only then is the
request queued for decoding and tokenizing. Short text-only prompts skip the pool altogether:
tokenizing a few kilobytes costs less than the hop to another process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..context_limit import context_problem
from ..errors import InvalidInput
from ..processor.image import (
    ImageDecodeError,
    ImageHeader,
    hd_image_size,
    num_image_tiles,
    num_image_tokens,
    probe_image,
)
from ..processor.prompt import ChatMessage, PromptBuilder
from .job import PreparedPrompt, PrepareJob, prepare
from .limits import max_bytes_per_token, min_text_tokens
from .pixel_store import PixelReservation, PixelStore
from .pool import PreprocessPool

# Text-only prompts up to this many bytes are tokenized on the event loop (about a millisecond).
INLINE_TEXT_BYTES = 4096


@dataclass(frozen=True)
class ImagePlan:
    """What an image's header says, before any pixel is decoded."""

    header: ImageHeader
    num_crops: int
    tokens: int
    tiles: int  # 336-px crops the vision tower will run
    processed_size: tuple[int, int]  # (H, W) of the padded HD image


@dataclass(frozen=True)
class Checked:
    """A call that passed the cheap checks."""

    messages: tuple[ChatMessage, ...]
    images: tuple[bytes, ...]
    plans: tuple[ImagePlan, ...]
    num_crops: int

    @property
    def image_tokens(self) -> int:
        return sum(p.tokens for p in self.plans)

    @property
    def text_bytes(self) -> int:
        return sum(len(m.text.encode("utf-8")) for m in self.messages)


@dataclass
class Prepared:
    """A prepared prompt and the pixel memory its images hold until the request ends."""

    prompt: PreparedPrompt
    reservation: PixelReservation | None


class Preparer:
    def __init__(
        self, builder: PromptBuilder, pool: PreprocessPool, store: PixelStore, max_pixels: int, context_len: int
    ) -> None:
        self.builder = builder
        self.pool = pool
        self.store = store
        self.max_pixels = max_pixels
        self.context_len = context_len
        self.bytes_per_token = max_bytes_per_token(builder.tokenizer)

    def check(
        self, messages: tuple[ChatMessage, ...], images: tuple[bytes, ...], num_crops: int, max_new_tokens: int
    ) -> Checked:
        """Refuse what can never run, from sizes alone (no decode, no tokenizing)."""
        plans = []
        for k, data in enumerate(images):
            try:
                header = probe_image(data, self.max_pixels)
                tokens = num_image_tokens(header.width, header.height, num_crops)
                tiles = num_image_tiles(header.width, header.height, num_crops)
                size = hd_image_size(header.width, header.height, num_crops)
            except (ImageDecodeError, ValueError) as exc:
                raise InvalidInput(f"images[{k}]", str(exc)) from exc
            plans.append(ImagePlan(header, num_crops, tokens, tiles, size))
        checked = Checked(messages, images, tuple(plans), num_crops)
        floor = min_text_tokens((m.text for m in messages), self.bytes_per_token) + checked.image_tokens
        detail = f"{checked.text_bytes} bytes of text, {checked.image_tokens} image tokens"
        problem = context_problem(floor, max_new_tokens, self.context_len, at_least=True, detail=detail)
        if problem:
            raise InvalidInput(*problem)
        return checked

    def _job(self, checked: Checked, pixel_paths: tuple[str, ...]) -> PrepareJob:
        return PrepareJob(
            messages=checked.messages,
            images=checked.images,
            image_tokens=tuple(p.tokens for p in checked.plans),
            num_crops=checked.num_crops,
            max_pixels=self.max_pixels,
            pixel_paths=pixel_paths,
        )

    def _inline(self, checked: Checked) -> bool:
        return not checked.images and checked.text_bytes <= INLINE_TEXT_BYTES

    async def count(self, checked: Checked) -> PreparedPrompt:
        """Token ids only (CountTokens): images are counted from their headers, never decoded."""
        job = self._job(checked, ())
        if checked.text_bytes <= INLINE_TEXT_BYTES:
            return prepare(job, self.builder)
        return await self.pool.run(job, on_abandon=lambda: None)

    async def prepare(self, checked: Checked) -> Prepared:
        """Token ids and images ready for a worker. On failure or cancellation nothing stays held."""
        if self._inline(checked):
            return Prepared(prepare(self._job(checked, ()), self.builder), None)
        reservation = None
        if checked.images:
            reservation = self.store.reserve([p.tiles for p in checked.plans])
        owned = reservation
        try:
            prompt = await self.pool.run(
                self._job(checked, reservation.paths if reservation else ()),
                on_abandon=lambda: self.release(owned),
            )
        except asyncio.CancelledError:
            raise  # the pool releases the pixels once the job is over
        except BaseException:
            self.release(owned)
            raise
        return Prepared(prompt, reservation)

    def release(self, reservation: PixelReservation | None) -> None:
        if reservation is not None:
            self.store.release(reservation)
