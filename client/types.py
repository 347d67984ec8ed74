"""Plain result types of the VisionChat client, independent of protobuf and of gRPC.

Callers (scripts, tests, the CLI) should never need to touch generated proto classes to read a
result, so everything the server reports is copied into these dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

# A path is read by the client; bytes are sent as they are (already-encoded JPEG/PNG/WebP...).
ImageSource = str | os.PathLike | bytes


@dataclass(frozen=True)
class Video:
    """A clip (a path or its encoded bytes) and how the server samples its frames; None leaves an
    option to the server (num_frames and frames_per_second both unset: its --default-video-frames)."""

    source: ImageSource
    num_frames: int | None = None
    frames_per_second: float | None = None
    start_seconds: float | None = None
    end_seconds: float | None = None
    num_crops: int | None = None
    timestamps_in_prompt: bool = False


# A bare path or bytes is a Video with the server's default sampling.
VideoLike = Video | ImageSource


def _as_dict(obj: Any) -> dict[str, Any]:
    # dataclasses.asdict recurses into nested dataclasses and lists, which is all these types hold.
    return dataclasses.asdict(obj)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and the top-N alternatives at that position."""

    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    video_tokens: int = 0  # the part of image_tokens that stands for video frames

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class Timings:
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class Delta:
    """Text generated since the previous delta and the tokens behind it.

    The text may lag its tokens (incomplete UTF-8 or a possible stop string), so token_ids and text
    of one delta need not correspond; only the concatenations over the whole stream do.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    # None when logprobs were not requested, so "not asked" differs from "none returned".
    logprobs: list[TokenLogprob] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _as_dict(self)
        if self.logprobs is None:
            del data["logprobs"]
        return data


@dataclass(frozen=True)
class VideoFrameInfo:
    frame_index: int  # position in the clip, presentation order
    timestamp_seconds: float  # from the clip's first frame
    tokens: int


@dataclass(frozen=True)
class VideoInfo:
    """A video as the server read it (upright size) and the frames it sampled."""

    video_index: int
    width: int
    height: int
    duration_seconds: float
    num_crops: int
    tokens: int
    codec: str
    frames_decoded: int
    frames: list[VideoFrameInfo] = field(default_factory=list)


@dataclass(frozen=True)
class ChatResult:
    """The whole answer of one Chat/Generate call: concatenated deltas plus the final report."""

    text: str
    token_ids: list[int]
    # Lowercase FinishReason name without its prefix: "eos", "length", "stop_string",
    # "stop_token", "cancelled", "error" (or "unspecified" from a misbehaving server).
    finish_reason: str
    usage: Usage
    timings: Timings
    request_id: str
    logprobs: list[TokenLogprob] | None = None
    matched_stop: str = ""
    # Server-side explanation; only set when finish_reason == "error".
    error_message: str = ""
    videos: list[VideoInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = _as_dict(self)
        if self.logprobs is None:
            del data["logprobs"]
        return data


@dataclass(frozen=True)
class ImageTokenCount:
    image_index: int
    width: int
    height: int
    num_crops: int
    tokens: int
    processed_width: int = 0  # the padded HD image the model sees
    processed_height: int = 0
    crops: int = 0  # 336-px crops through the vision tower, the global view included


@dataclass(frozen=True)
class TokenCount:
    """Result of CountTokens: what a Chat with the same input would report as prompt usage."""

    prompt_tokens: int
    text_tokens: int
    image_tokens: int
    images: list[ImageTokenCount] = field(default_factory=list)
    video_tokens: int = 0
    videos: list[VideoInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)
