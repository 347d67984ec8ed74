"""The preprocessing work of one request: tokenize the conversation, decode and transform its images.

`prepare` runs in a preprocessing pool process (or inline for short text-only prompts). It is a plain
function of its inputs; the pool process keeps one PromptBuilder, loaded by `init_process`.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from ..engine.pixels import PixelFile
from ..engine.request import ImageInput
from ..errors import InvalidInput, Overloaded
from ..processor.image import ImageDecodeError
from ..processor.prompt import ChatMessage, EncodedPrompt, PromptBuilder, PromptError
from ..processor.video import VideoLimits, VideoPlan
from ..structured import Grammars, ResponseFormat
from .images import image_input
from .videos import PlannedVideo, VideoRequest, decode_video, plan_videos


@dataclass(frozen=True)
class PrepareJob:
    messages: tuple[ChatMessage, ...]
    images: tuple[bytes, ...]
    image_tokens: tuple[int, ...]  # per image, from its header: the prompt can be built before decoding
    num_crops: int
    max_pixels: int
    # Where each image's crops go, then each video frame's (videos in order); empty = count only.
    pixel_paths: tuple[str, ...] = ()
    live_marker: str = ""  # a file that exists while the request still wants this job ("": no check)
    allow_special_tokens_in_text: bool = False
    videos: tuple[PlannedVideo, ...] = ()

    def check_wanted(self) -> None:
        """Between images and frames: stop if the request went away (cancelled, deadline, client gone)."""
        if self.live_marker and not os.path.exists(self.live_marker):
            raise Abandoned("the request was cancelled while it was being preprocessed")


class Abandoned(Exception):
    """The job's request went away; nothing it made is kept."""


@dataclass(frozen=True)
class PreparedPrompt:
    prompt_ids: tuple[int, ...]
    images: tuple[ImageInput, ...]  # in prompt order (slot s is -(s + 1)); empty when the job only counted
    seconds: float = 0.0
    video_decode_seconds: tuple[float, ...] = ()  # per video

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def tokenize(job: PrepareJob, builder: PromptBuilder) -> EncodedPrompt:
    try:
        return builder.encode_prompt(
            job.messages,
            list(job.image_tokens),
            [v.prompt_frames() for v in job.videos],
            job.allow_special_tokens_in_text,
        )
    except PromptError as exc:
        raise InvalidInput(exc.field, exc.message) from exc


def prepare(job: PrepareJob, builder: PromptBuilder) -> PreparedPrompt:
    start = time.perf_counter()
    prompt = tokenize(job, builder)
    ids = tuple(prompt.ids)
    if not job.pixel_paths:  # counting only: token counts came from headers and video plans
        return PreparedPrompt(ids, (), time.perf_counter() - start)
    decoded: dict[tuple[str, int, int], ImageInput] = {}
    video_seconds: list[float] = []
    try:
        paths = iter(job.pixel_paths)
        for k, (data, path) in enumerate(zip(job.images, paths, strict=False)):
            job.check_wanted()
            decoded["image", k, 0] = _image(k, data, job, path)
        for v, video in enumerate(job.videos):
            frames = decode_video(v, video, [next(paths) for _ in video.plan.frames], job.check_wanted)
            video_seconds.append(frames.seconds)
            decoded.update((("video", v, f), image) for f, image in enumerate(frames.images))
    except OSError as exc:  # the shared-memory folder is full (its size is the operator's)
        _delete(job.pixel_paths)
        raise Overloaded(f"no room for preprocessed pixels ({exc}); retry later") from exc
    except BaseException:
        _delete(job.pixel_paths)
        raise
    images = tuple(decoded[slot] for slot in prompt.slots)
    return PreparedPrompt(ids, images, time.perf_counter() - start, tuple(video_seconds))


def _image(k: int, data: bytes, job: PrepareJob, path: str) -> ImageInput:
    try:
        image = image_input(data, job.num_crops, job.max_pixels, path)
    except (ImageDecodeError, ValueError) as exc:
        raise InvalidInput(f"images[{k}]", str(exc)) from exc
    if image.num_tokens != job.image_tokens[k]:  # the header lied about the size
        raise InvalidInput(f"images[{k}]", "the decoded image's size differs from its header's")
    return image


def _delete(paths: tuple[str, ...]) -> None:
    for path in paths:
        PixelFile(path, 0).delete()


# --- inside a pool process ---------------------------------------------------------------------------

# The pool process's prompt builder, set once by its initializer (ProcessPoolExecutor's way of giving
# a worker process state).
_builder: PromptBuilder | None = None


def init_process(model_dir: str, nice: int) -> None:
    global _builder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend handles Ctrl-C and shuts the pool down
    if nice:
        os.nice(nice)  # below the event loop and the model workers: preprocessing yields the CPU to them
    _builder = PromptBuilder(model_dir)


def run_in_process(job: PrepareJob) -> PreparedPrompt:
    assert _builder is not None, "init_process did not run"
    return prepare(job, _builder)


def plan_in_process(job: tuple[tuple[VideoRequest, ...], VideoLimits]) -> tuple[VideoPlan, ...]:
    return plan_videos(*job)


# Built on the first response format this process checks (llguidance reads the tokenizer once).
_grammars: Grammars | None = None


def format_problem_in_process(job: tuple[ResponseFormat, int]) -> str:
    """Why llguidance cannot use this response format ("" when it can), for a vocabulary of this size."""
    global _grammars
    fmt, vocab_size = job
    assert _builder is not None, "init_process did not run"
    if _grammars is None or _grammars.vocab_size != vocab_size:
        _grammars = Grammars(_builder.tokenizer, vocab_size, _builder.eos_token_ids)
    return _grammars.problem(fmt)


def ping() -> int:
    """Forces the pool to start a process (and run its initializer) ahead of the first request."""
    return os.getpid()
