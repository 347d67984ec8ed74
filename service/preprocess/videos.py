"""Videos in the preprocessing pool: which frames (the plan), then the frames as engine images.

Planning opens the clip and reads its timestamps (one frame decoded); the frontend then knows every
frame's token count before it reserves pixel memory or admits the request. Decoding writes each
sampled frame's crops to shared memory like an uploaded image's, under a key of its own (the clip's
content, the frame's timestamp and the crop budget), so the encoder cache and the prefix cache treat
frames as images.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from ..engine.request import ImageInput
from ..errors import InvalidInput
from ..processor.image import num_image_tiles, num_image_tokens
from ..processor.prompt import VideoFrames
from ..processor.video import VideoError, VideoLimits, VideoOptions, VideoPlan, decode_frames, plan_video
from .images import pil_image_input


@dataclass(frozen=True)
class VideoRequest:
    """A video of a call: its bytes and how to sample it."""

    data: bytes
    options: VideoOptions


@dataclass(frozen=True)
class PlannedVideo:
    request: VideoRequest
    plan: VideoPlan

    @property
    def frame_tokens(self) -> int:
        return num_image_tokens(self.plan.width, self.plan.height, self.request.options.num_crops)

    @property
    def frame_tiles(self) -> int:
        return num_image_tiles(self.plan.width, self.plan.height, self.request.options.num_crops)

    @property
    def tokens(self) -> int:
        return self.frame_tokens * len(self.plan.frames)

    def prompt_frames(self) -> VideoFrames:
        frames = self.plan.frames
        return VideoFrames(
            (self.frame_tokens,) * len(frames), tuple(f.seconds for f in frames), self.request.options.timestamps
        )


@dataclass(frozen=True)
class DecodedFrames:
    images: tuple[ImageInput, ...]
    seconds: float


def plan_videos(videos: Sequence[VideoRequest], limits: VideoLimits) -> tuple[VideoPlan, ...]:
    """Every video's plan; an unusable clip is an InvalidInput naming it."""
    plans = []
    for v, video in enumerate(videos):
        try:
            plans.append(plan_video(video.data, video.options, limits))
        except VideoError as exc:
            raise InvalidInput(f"videos[{v}]", str(exc)) from exc
    return tuple(plans)


def _frame_key(video_key: bytes, pts: int, num_crops: int) -> bytes:
    h = hashlib.blake2b(video_key, digest_size=16, person=b"vc-frame")
    h.update(pts.to_bytes(8, "little", signed=True))
    h.update(num_crops.to_bytes(1, "little"))
    return h.digest()


def decode_video(
    v: int, video: PlannedVideo, paths: Sequence[str], check_wanted: Callable[[], None] = lambda: None
) -> DecodedFrames:
    """The video's sampled frames as engine images, their crops written to `paths` (one per frame);
    `check_wanted` runs after each decoded frame and raises to stop."""
    start = time.perf_counter()
    plan, num_crops = video.plan, video.request.options.num_crops
    video_key = hashlib.blake2b(video.request.data, digest_size=16, person=b"vc-video").digest()
    images = []
    try:
        for frame, image, path in zip(
            plan.frames, decode_frames(video.request.data, plan, check_wanted), paths, strict=True
        ):
            if image.size != (plan.width, plan.height):  # the clip changed resolution: keep its first one's
                image = image.resize((plan.width, plan.height), Image.Resampling.BILINEAR)
            images.append(pil_image_input(image, _frame_key(video_key, frame.pts, num_crops), num_crops, path))
    except VideoError as exc:
        raise InvalidInput(f"videos[{v}]", str(exc)) from exc
    return DecodedFrames(tuple(images), time.perf_counter() - start)
