"""Request messages -> a validated call: conversation, images, sampling options.

Every check names the field (or the server limit) it enforces, as INVALID_ARGUMENT with
google.rpc.BadRequest details. All checks here are cheap; decoding and tokenizing come later
(service.preprocess).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from visionchat.v1 import visionchat_pb2 as pb

from ..config import ServerConfig
from ..context_limit import context_problem
from ..engine import SamplingOptions
from ..preprocess.videos import VideoRequest
from ..processor.image import MAX_NUM_CROPS
from ..processor.prompt import ChatMessage
from ..processor.video import VideoOptions
from ..structured import ResponseFormat
from .errors import ApiError, invalid_argument

ROLE_NAMES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MIN_REPETITION_PENALTY = 0.01  # 0 means unset; tinier values blow logits up to inf
DEFAULT_NUM_CROPS_SINGLE = 16
DEFAULT_NUM_CROPS_MULTI = 4
DEFAULT_NUM_CROPS_VIDEO = 4  # the model card's advice for multi-frame input
MAX_REQUEST_ID_LENGTH = 256


@dataclass(frozen=True)
class Call:
    """One chat call, whichever RPC carried it."""

    messages: tuple[ChatMessage, ...]
    images: tuple[bytes, ...]
    sampling: pb.SamplingParams
    num_crops: int | None
    request_id: str
    videos: tuple[VideoRequest, ...] = ()


def convert_messages(messages: Iterable[pb.Message]) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLE_NAMES:
            raise invalid_argument(f"messages[{i}].role", "role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        out.append(
            ChatMessage(
                role=ROLE_NAMES[m.role],
                text=m.text,
                image_indices=tuple(m.image_indices),
                video_indices=tuple(m.video_indices),
            )
        )
    if not out:
        raise invalid_argument("messages", "the conversation is empty")
    return tuple(out)


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise invalid_argument(
            "request_id", f"{len(request_id)} characters exceed the limit of {MAX_REQUEST_ID_LENGTH}"
        )


def num_crops_for(call: Call) -> int:
    """The crop budget of every image of the call: the request's, else the model card's advice."""
    if call.num_crops:
        return call.num_crops
    return DEFAULT_NUM_CROPS_SINGLE if len(call.images) == 1 else DEFAULT_NUM_CROPS_MULTI


def resolve_num_crops(options: pb.ImageOptions) -> int | None:
    if not options.HasField("num_crops"):
        return None
    n = options.num_crops
    if not 1 <= n <= MAX_NUM_CROPS:
        raise invalid_argument("image_options.num_crops", f"must be between 1 and {MAX_NUM_CROPS}, got {n}")
    return n


def video_options(options: pb.VideoOptions, field: str) -> VideoOptions:
    """A video's sampling options, each number checked (whether they fit the clip is known only once
    the clip is opened)."""

    def bad(name: str, msg: str) -> ApiError:
        return invalid_argument(f"{field}.{name}", msg)

    fps, start = options.frames_per_second, options.start_seconds
    if not math.isfinite(fps) or fps < 0:
        raise bad("frames_per_second", f"must be a finite number >= 0, got {fps}")
    if not math.isfinite(start) or start < 0:
        raise bad("start_seconds", f"must be a finite number >= 0, got {start}")
    end = options.end_seconds if options.HasField("end_seconds") else None
    if end is not None and (not math.isfinite(end) or end <= start):
        raise bad("end_seconds", f"must be a finite number after start_seconds ({start:g}), got {end}")
    num_crops = DEFAULT_NUM_CROPS_VIDEO
    if options.HasField("num_crops"):
        num_crops = options.num_crops
        if not 1 <= num_crops <= MAX_NUM_CROPS:
            raise bad("num_crops", f"must be between 1 and {MAX_NUM_CROPS}, got {num_crops}")
    return VideoOptions(
        num_frames=options.num_frames,
        frames_per_second=fps,
        start_seconds=start,
        end_seconds=end,
        num_crops=num_crops,
        timestamps=options.timestamps_in_prompt,
    )


def check_video_limits(config: ServerConfig, sizes: list[int], field: str = "videos") -> None:
    _check_attachment_limits(
        "video", sizes, field, config.max_videos, config.max_video_bytes, config.max_total_video_bytes
    )


def inline_videos(config: ServerConfig, videos: Iterable[pb.Video]) -> tuple[VideoRequest, ...]:
    """Generate's and CountTokens' videos, checked."""
    videos = list(videos)
    check_video_limits(config, [len(v.data) for v in videos])
    out = []
    for v, video in enumerate(videos):
        if not video.data:
            raise invalid_argument(f"videos[{v}].data", "the video is empty")
        out.append(VideoRequest(video.data, video_options(video.options, f"videos[{v}].options")))
    return tuple(out)


def check_image_limits(config: ServerConfig, sizes: list[int], field: str = "images") -> None:
    _check_attachment_limits(
        "image", sizes, field, config.max_images, config.max_image_bytes, config.max_total_image_bytes
    )


def _check_attachment_limits(
    kind: str, sizes: list[int], field: str, max_count: int, max_bytes: int, max_total: int
) -> None:
    """Count, per-item and total byte limits of a request's images or videos (flags --max-{kind}s,
    --max-{kind}-bytes, --max-total-{kind}-bytes)."""
    if len(sizes) > max_count:
        raise invalid_argument(
            field, f"{len(sizes)} {kind}s exceed the limit of {max_count} per request (--max-{kind}s)"
        )
    for k, size in enumerate(sizes):
        if size > max_bytes:
            raise invalid_argument(
                f"{field}[{k}]", f"{size} bytes exceed the limit of {max_bytes} bytes per {kind} (--max-{kind}-bytes)"
            )
    total = sum(sizes)
    if total > max_total:
        raise invalid_argument(
            field, f"{total} {kind} bytes exceed the limit of {max_total} per request (--max-total-{kind}-bytes)"
        )


def validate_sampling(s: pb.SamplingParams, config: ServerConfig, vocab_size: int) -> None:
    def bad(name: str, msg: str) -> ApiError:
        return invalid_argument(f"sampling.{name}", msg)

    if s.max_new_tokens > config.max_new_tokens:
        raise bad(
            "max_new_tokens", f"{s.max_new_tokens} exceeds the limit of {config.max_new_tokens} (--max-new-tokens)"
        )
    if not math.isfinite(s.temperature) or not 0 <= s.temperature <= MAX_TEMPERATURE:
        raise bad("temperature", f"must be between 0 and {MAX_TEMPERATURE}, got {s.temperature}")
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise bad("top_p", f"must be between 0 and 1, got {s.top_p}")
    if s.top_k > vocab_size:
        raise bad("top_k", f"must be at most the vocabulary size {vocab_size}, got {s.top_k}")
    penalty = s.repetition_penalty
    if not math.isfinite(penalty) or not (penalty == 0 or MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY):
        raise bad(
            "repetition_penalty",
            f"must be 0 (off) or between {MIN_REPETITION_PENALTY} and {MAX_REPETITION_PENALTY}, got {penalty}",
        )
    if s.logprobs > MAX_LOGPROBS:
        raise bad("logprobs", f"at most {MAX_LOGPROBS} top log-probabilities per token, got {s.logprobs}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise bad(f"stop[{i}]", f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long")
    for i, tid in enumerate(s.stop_token_ids):
        if tid >= vocab_size:
            raise bad(f"stop_token_ids[{i}]", f"token id {tid} is outside the vocabulary (size {vocab_size})")


def sampling_options(
    s: pb.SamplingParams,
    prompt_len: int,
    config: ServerConfig,
    context_len: int,
    eos_token_ids: tuple[int, ...],
    response_format: ResponseFormat | None = None,
) -> SamplingOptions:
    problem = context_problem(prompt_len, s.max_new_tokens, context_len)
    if problem:
        raise invalid_argument(*problem)
    max_new = s.max_new_tokens or min(config.default_max_new_tokens, context_len - prompt_len)
    return SamplingOptions(
        max_new_tokens=max_new,
        temperature=float(s.temperature),
        top_p=float(s.top_p) if 0 < s.top_p < 1 else 1.0,
        top_k=int(s.top_k),
        repetition_penalty=float(s.repetition_penalty) if s.repetition_penalty > 0 else 1.0,
        seed=int(s.seed) if s.HasField("seed") else None,
        stop_token_ids=frozenset(int(t) for t in s.stop_token_ids),
        eos_token_ids=frozenset() if s.ignore_eos else frozenset(eos_token_ids),
        logprobs=int(s.logprobs),
        response_format=response_format,
    )
