"""From a validated call to a prepared prompt: cheap checks on the event loop, heavy work in the pool.

Order matters: everything that can refuse a request from sizes alone runs first, on the event loop,
in microseconds (image headers, a lower bound on the text's tokens, budgets); only then is the
request queued for decoding and tokenizing. Short text-only prompts skip the pool altogether:
tokenizing a few kilobytes costs less than the hop to another process.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from ..processor.video import VideoLimits
from ..structured import FormatCache, ResponseFormat
from . import job as job_module
from .job import PreparedPrompt, PrepareJob, prepare
from .limits import max_bytes_per_token, min_text_tokens
from .pixel_store import PixelReservation, PixelStore
from .pool import PreprocessPool
from .videos import PlannedVideo, VideoRequest

# Text-only prompts up to this many bytes are tokenized on the event loop (about a millisecond).
INLINE_TEXT_BYTES = 4096
FORMAT_CACHE_SIZE = 1024  # response formats whose verdict the frontend remembers


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
    """A call that passed the cheap checks (and, once planned, knows its videos' frames)."""

    messages: tuple[ChatMessage, ...]
    images: tuple[bytes, ...]
    plans: tuple[ImagePlan, ...]
    num_crops: int
    videos: tuple[VideoRequest, ...] = ()
    planned: tuple[PlannedVideo, ...] | None = None  # None until `Preparer.plan` ran
    response_format: ResponseFormat | None = None

    @property
    def video_tokens(self) -> int:
        return sum(v.tokens for v in self.planned or ())

    @property
    def largest_image_tokens(self) -> int:
        frames = (v.frame_tokens for v in self.planned or ())
        return max([p.tokens for p in self.plans] + list(frames), default=0)

    @property
    def image_tokens(self) -> int:
        """Every position the vision tower fills: images and video frames."""
        return sum(p.tokens for p in self.plans) + self.video_tokens

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
        self,
        builder: PromptBuilder,
        pool: PreprocessPool,
        store: PixelStore,
        max_pixels: int,
        context_len: int,
        video_limits: VideoLimits,
        vocab_size: int,
        allow_special_tokens_in_text: bool = False,
    ) -> None:
        self.builder = builder
        self.pool = pool
        self.store = store
        self.max_pixels = max_pixels
        self.context_len = context_len
        self.video_limits = video_limits
        self.vocab_size = vocab_size
        self.allow_special_tokens_in_text = allow_special_tokens_in_text
        self._format_problems = FormatCache(FORMAT_CACHE_SIZE)  # "" = usable
        self.bytes_per_token = max_bytes_per_token(builder.tokenizer)

    def check(
        self,
        messages: tuple[ChatMessage, ...],
        images: tuple[bytes, ...],
        num_crops: int,
        max_new_tokens: int,
        videos: tuple[VideoRequest, ...] = (),
        response_format: ResponseFormat | None = None,
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
        checked = Checked(messages, images, tuple(plans), num_crops, videos, None if videos else (), response_format)
        self._check_context(checked, max_new_tokens)
        return checked

    def min_prompt_tokens(self, checked: Checked) -> int:
        """A lower bound on the prompt's tokens, known before tokenizing or decoding."""
        return min_text_tokens((m.text for m in checked.messages), self.bytes_per_token) + checked.image_tokens

    def _check_context(self, checked: Checked, max_new_tokens: int) -> None:
        floor = self.min_prompt_tokens(checked)
        detail = f"{checked.text_bytes} bytes of text, {checked.image_tokens} image tokens"
        if checked.video_tokens:
            detail += f" ({checked.video_tokens} of them video frames)"
        problem = context_problem(floor, max_new_tokens, self.context_len, at_least=True, detail=detail)
        if problem:
            raise InvalidInput(*problem)

    async def plan(self, checked: Checked, max_new_tokens: int) -> Checked:
        """Choose the videos' frames (in the pool: it opens the clips) and check what they cost."""
        if checked.planned is not None:
            return checked
        plans = await self.pool.run(job_module.plan_in_process, (checked.videos, self.video_limits))
        planned = tuple(PlannedVideo(v, p) for v, p in zip(checked.videos, plans, strict=True))
        frames = sum(len(p.plan.frames) for p in planned)
        if frames > self.video_limits.max_frames:
            raise InvalidInput(
                "videos",
                f"{frames} sampled frames exceed the limit of {self.video_limits.max_frames} per request "
                "(--max-video-frames)",
            )
        checked = dataclasses.replace(checked, planned=planned)
        self._check_context(checked, max_new_tokens)
        return checked

    async def check_format(self, fmt: ResponseFormat | None) -> None:
        """Refuse a response format llguidance cannot use (it reads it in the pool; verdicts are cached)."""
        if fmt is None:
            return
        problem = self._format_problems.get(fmt)
        if problem is None:
            problem = await self.pool.run(job_module.format_problem_in_process, (fmt, self.vocab_size))
            self._format_problems.put(fmt, problem)
        if problem:
            raise InvalidInput(fmt.field, problem)

    def _job(self, checked: Checked, reservation: PixelReservation | None) -> PrepareJob:
        assert checked.planned is not None, "plan() first"
        return PrepareJob(
            messages=checked.messages,
            images=checked.images,
            image_tokens=tuple(p.tokens for p in checked.plans),
            num_crops=checked.num_crops,
            max_pixels=self.max_pixels,
            pixel_paths=reservation.paths if reservation else (),
            live_marker=reservation.live_marker if reservation else "",
            allow_special_tokens_in_text=self.allow_special_tokens_in_text,
            videos=checked.planned,
        )

    def _inline(self, checked: Checked) -> bool:
        return not checked.images and not checked.videos and checked.text_bytes <= INLINE_TEXT_BYTES

    async def count(self, checked: Checked) -> PreparedPrompt:
        """Token ids only (CountTokens): images are counted from their headers, videos from their plans;
        nothing is decoded."""
        job = self._job(checked, None)
        if checked.text_bytes <= INLINE_TEXT_BYTES:
            return prepare(job, self.builder)
        return await self.pool.run(job_module.run_in_process, job)

    async def prepare(self, checked: Checked) -> Prepared:
        """Token ids and images ready for a worker. On failure or cancellation nothing stays held."""
        if self._inline(checked):
            return Prepared(prepare(self._job(checked, None), self.builder), None)
        reservation = None
        tiles = [p.tiles for p in checked.plans]
        tiles += [v.frame_tiles for v in checked.planned or () for _ in v.plan.frames]
        if tiles:
            reservation = self.store.reserve(tiles)
        owned = reservation
        try:
            prompt = await self.pool.run(
                job_module.run_in_process,
                self._job(checked, reservation),
                on_abandon=lambda: self.release(owned),
            )
        except asyncio.CancelledError:
            if owned is not None:  # the job stops at its next frame; the pool then releases the pixels
                self.store.abandon(owned)
            raise
        except BaseException:
            self.release(owned)
            raise
        return Prepared(prompt, reservation)

    def release(self, reservation: PixelReservation | None) -> None:
        if reservation is not None:
            self.store.release(reservation)
