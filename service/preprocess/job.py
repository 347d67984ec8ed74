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
from ..processor.prompt import ChatMessage, PromptBuilder, PromptError
from .images import image_input


@dataclass(frozen=True)
class PrepareJob:
    messages: tuple[ChatMessage, ...]
    images: tuple[bytes, ...]
    image_tokens: tuple[int, ...]  # per image, from its header: the prompt can be built before decoding
    num_crops: int
    max_pixels: int
    pixel_paths: tuple[str, ...] = ()  # where each image's crops go; empty = count only (CountTokens)


@dataclass(frozen=True)
class PreparedPrompt:
    prompt_ids: tuple[int, ...]
    images: tuple[ImageInput, ...]  # empty when the job only counted
    seconds: float = 0.0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def tokenize(job: PrepareJob, builder: PromptBuilder) -> tuple[int, ...]:
    try:
        return tuple(builder.encode(job.messages, list(job.image_tokens)))
    except PromptError as exc:
        raise InvalidInput(exc.field, exc.message) from exc


def prepare(job: PrepareJob, builder: PromptBuilder) -> PreparedPrompt:
    start = time.perf_counter()
    ids = tokenize(job, builder)
    if not job.pixel_paths:  # counting only: the images' token counts came from their headers
        return PreparedPrompt(ids, (), time.perf_counter() - start)
    images: list[ImageInput] = []
    try:
        for k, (data, path) in enumerate(zip(job.images, job.pixel_paths, strict=True)):
            try:
                image = image_input(data, job.num_crops, job.max_pixels, path)
            except (ImageDecodeError, ValueError) as exc:
                raise InvalidInput(f"images[{k}]", str(exc)) from exc
            except OSError as exc:  # the shared-memory folder is full (its size is the operator's)
                raise Overloaded(f"no room for preprocessed pixels ({exc}); retry later") from exc
            if image.num_tokens != job.image_tokens[k]:  # the header lied about the size
                raise InvalidInput(f"images[{k}]", "the decoded image's size differs from its header's")
            images.append(image)
    except BaseException:
        for path in job.pixel_paths:
            PixelFile(path, 0).delete()
        raise
    return PreparedPrompt(ids, tuple(images), time.perf_counter() - start)


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


def ping() -> int:
    """Forces the pool to start a process (and run its initializer) ahead of the first request."""
    return os.getpid()
