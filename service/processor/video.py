"""Video clips -> sampled frames: probe the container, choose frames by a fixed formula, decode them.

Phi-3.5-vision sees a video as a sequence of images (the model card's multi-frame use). This module
decides which frames those are and decodes them with PyAV; the frames then take the image path
(HD transform, vision tower, encoder cache) like any uploaded image.

Which frames (documented in README, "Video"): let t_0 < t_1 < ... < t_{n-1} be the clip's frame
presentation times in seconds from its first frame, and D = t_{n-1} + the last frame's duration.
The range is [a, b) with a = start_seconds (default 0) and b = min(end_seconds, D) (default D).
With num_frames = N, or with frames_per_second = r and then N = max(1, floor((b - a) * r)),
the targets are  tau_i = a + (i + 1/2) * (b - a) / N  for i = 0 .. N-1, and target i takes the frame
shown at tau_i: the last j with t_j <= tau_i. A frame picked twice (N larger than the frames in the
range) is kept once.

Decoding seeks: frames are read in order; before a target whose governing keyframe (the last
keyframe at or before it) lies beyond what was already decoded, the reader seeks to that keyframe
instead of decoding everything in between. The number of frames that will be decoded is known from
the demux pass, before any decoding, and is bounded by a limit.

Rotation: a clip's display matrix (phones record portrait video as rotated landscape) is applied, as
ffmpeg does by default, so the model sees the video upright; width and height are the upright ones.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

# Demuxers a client may send (a component of FFmpeg's demuxer names). Image "demuxers" (a PNG sent as
# a video), playlists (hls, concat: they open other files) and everything else stay out.
FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts"
# Bytes FFmpeg reads to find the streams (its default); a hostile file cannot make it read more.
PROBE_BYTES = 5_000_000
# The demux pass stops a file with absurdly many packets (tiny packets packed into the byte limit).
MAX_PACKETS = 1_000_000
# Corrupt packets skipped while decoding before the clip is given up on.
MAX_BAD_PACKETS = 16


class VideoError(ValueError):
    """The bytes are not a clip this service can use, or the options do not fit it; the message says why."""


@dataclass(frozen=True)
class VideoOptions:
    num_frames: int = 0  # 0: frames_per_second, or the server default when that is 0 too
    frames_per_second: float = 0.0
    start_seconds: float = 0.0
    end_seconds: float | None = None  # None: the end of the clip
    num_crops: int = 4
    timestamps: bool = False  # "<t>s: " text before each frame in the prompt


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int  # sampled frames, per request
    max_pixels: int  # per frame
    max_seconds: float
    max_decoded_frames: int  # frames decoded to reach the sampled ones, per video
    default_frames: int


@dataclass(frozen=True)
class SampledFrame:
    index: int  # position in the clip's presentation order
    pts: int  # in the stream's time base
    seconds: float  # from the clip's first frame
    keyframe_pts: int  # the keyframe decoding may start from to reach this frame


@dataclass(frozen=True)
class VideoPlan:
    """What a clip will contribute, known before any frame beyond the first is decoded."""

    width: int  # upright
    height: int
    rotation: int  # degrees counter-clockwise of the display matrix, as PyAV reports it
    duration_seconds: float
    codec: str
    frames: tuple[SampledFrame, ...]
    frames_to_decode: int


@dataclass(frozen=True)
class _Packet:
    pts: int
    keyframe: bool
    duration: int


def _refuse_nested_open(url: str, flags: int, options: dict[str, str]) -> None:
    raise PermissionError(f"the clip refers to another file ({url!r}); only self-contained clips are accepted")


def _open(data: bytes) -> Any:
    import av

    if not data:
        raise VideoError("the clip is empty")
    try:
        return av.open(
            io.BytesIO(data),
            mode="r",
            container_options={
                "format_whitelist": FORMAT_WHITELIST,
                "probesize": str(PROBE_BYTES),
                "analyzeduration": str(5_000_000),
            },
            io_open=_refuse_nested_open,
        )
    except av.ArgumentError as exc:
        raise VideoError(f"not a supported video container (accepted: {FORMAT_WHITELIST}): {exc}") from exc
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"not a readable video container (corrupt or truncated?): {exc}") from exc


def _video_stream(container: Any) -> Any:
    import av

    streams = [
        s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)
    ]  # cover art of an audio file is not a video
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        held = f" (the file holds only: {', '.join(kinds)})" if kinds else ""
        raise VideoError(f"no video stream{held}")
    stream = streams[0]
    if stream.codec_context is None:
        raise VideoError("the video codec is not supported (this server has no decoder for it)")
    return stream


def _codec_name(stream: Any) -> str:
    try:
        return str(stream.codec_context.codec.canonical_name)
    except AttributeError:
        return str(stream.codec_context.name)


def _packets(container: Any, stream: Any) -> list[_Packet]:
    """Every frame's packet (timestamp, keyframe flag, duration), without decoding; presentation order."""
    out: list[_Packet] = []
    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue  # the flush packet at the end
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is None:
                continue
            out.append(_Packet(int(pts), bool(packet.is_keyframe), int(packet.duration or 0)))
            if len(out) > MAX_PACKETS:
                raise VideoError(f"the clip has more than {MAX_PACKETS} video packets")
    except VideoError:
        raise
    except Exception as exc:  # noqa: BLE001  (any demuxer failure is the file's)
        if not out:
            raise VideoError(f"the video stream cannot be read: {exc}") from exc
        # A truncated tail: the packets read so far are the clip.
    out.sort(key=lambda p: p.pts)
    unique = [p for i, p in enumerate(out) if i == 0 or p.pts != out[i - 1].pts]
    if not unique:
        raise VideoError("the video stream has no frames")
    return unique


def _first_frame(container: Any, stream: Any) -> Any:
    """The first decodable frame (its rotation and true size), or VideoError when none decodes."""
    container.seek(0, stream=stream, backward=True, any_frame=False)
    try:
        for frame in _frames(container, stream):
            return frame
    except VideoError as exc:
        raise VideoError(f"no frame of the clip decodes: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise VideoError(f"no frame of the clip decodes: {exc}") from exc
    raise VideoError("no frame of the clip decodes")


def _frames(container: Any, stream: Any) -> Iterator[Any]:
    """Decoded frames in presentation order, skipping a few corrupt packets."""
    import av

    bad = 0
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError as exc:
            bad += 1
            if bad > MAX_BAD_PACKETS:
                raise VideoError(f"more than {MAX_BAD_PACKETS} corrupt packets in the video stream: {exc}") from exc


def _seconds(ticks: int, time_base: Fraction) -> float:
    return float(ticks * time_base)


def _duration(packets: list[_Packet], time_base: Fraction, rate: Fraction | None) -> float:
    """Seconds from the first frame to the end of the last one."""
    span = packets[-1].pts - packets[0].pts
    last = packets[-1].duration
    if last <= 0 and len(packets) > 1:
        last = int(np.median(np.diff([p.pts for p in packets])))
    if last <= 0 and rate:
        last = round(1 / (rate * time_base))
    return _seconds(span + max(last, 0), time_base)


def frame_count(duration: float, start: float, end: float, options: VideoOptions, limits: VideoLimits) -> int:
    """N of the module's formula."""
    if options.num_frames:
        return options.num_frames
    if options.frames_per_second:
        return max(1, math.floor((end - start) * options.frames_per_second + 1e-9))
    return limits.default_frames


def sample(times: list[float], duration: float, options: VideoOptions, limits: VideoLimits) -> list[int]:
    """Indices (into `times`, the frames' presentation times from the first frame) of the sampled frames."""
    start = options.start_seconds
    if not 0 <= start < duration:
        raise VideoError(f"start_seconds {start:g} is outside the clip (0 to {duration:.3f} s)")
    end = duration if options.end_seconds is None else min(options.end_seconds, duration)
    if end <= start:
        raise VideoError(f"end_seconds {end:g} is not after start_seconds {start:g}")
    n = frame_count(duration, start, end, options, limits)
    if n > limits.max_frames:
        how = (
            f"{options.frames_per_second:g} frames per second over {end - start:.3f} s"
            if options.frames_per_second and not options.num_frames
            else f"{n} frames"
        )
        raise VideoError(f"{how} exceed the limit of {limits.max_frames} frames per request (--max-video-frames)")
    picked: list[int] = []
    for i in range(n):
        tau = start + (i + 0.5) * (end - start) / n
        j = int(np.searchsorted(times, tau + 1e-9, side="right")) - 1
        j = max(j, 0)
        if not picked or picked[-1] != j:
            picked.append(j)
    return picked


@contextmanager
def _ffmpeg_errors_are_the_clips() -> Iterator[None]:
    """What FFmpeg raises while reading a clip is about the clip (its errors may subclass OSError, which
    would otherwise read as a full disk)."""
    import av

    try:
        yield
    except av.FFmpegError as exc:
        raise VideoError(f"the clip cannot be read: {exc}") from exc


def plan_video(data: bytes, options: VideoOptions, limits: VideoLimits) -> VideoPlan:
    """Open the clip, check it against the limits, and choose its frames (only the first is decoded)."""
    container = _open(data)
    with container, _ffmpeg_errors_are_the_clips():
        stream = _video_stream(container)
        cc = stream.codec_context
        if cc.width and cc.height and cc.width * cc.height > limits.max_pixels:
            raise VideoError(
                f"{cc.width}x{cc.height} frames exceed the limit of {limits.max_pixels} pixels per frame "
                "(--max-video-pixels)"
            )
        if container.duration and container.duration / 1_000_000 > limits.max_seconds:
            raise VideoError(
                f"the clip lasts {container.duration / 1_000_000:.1f} s, over the limit of {limits.max_seconds:g} s "
                "(--max-video-seconds)"
            )
        time_base = stream.time_base
        if not time_base:
            raise VideoError("the video stream has no time base")
        packets = _packets(container, stream)
        duration = _duration(packets, time_base, stream.average_rate)
        if duration > limits.max_seconds:
            raise VideoError(
                f"the clip lasts {duration:.1f} s, over the limit of {limits.max_seconds:g} s (--max-video-seconds)"
            )
        first = _first_frame(container, stream)
        width, height = (first.height, first.width) if round(first.rotation / 90) % 2 else (first.width, first.height)
        if width * height > limits.max_pixels:
            raise VideoError(
                f"{width}x{height} frames exceed the limit of {limits.max_pixels} pixels per frame (--max-video-pixels)"
            )
        origin = packets[0].pts
        times = [_seconds(p.pts - origin, time_base) for p in packets]
        picked = sample(times, duration, options, limits)
        keyframe = 0
        governing: list[int] = []  # per packet: the last keyframe at or before it
        for i, p in enumerate(packets):
            if p.keyframe:
                keyframe = i
            governing.append(keyframe)
        frames = tuple(SampledFrame(j, packets[j].pts, times[j], packets[governing[j]].pts) for j in picked)
        to_decode = _frames_to_decode(picked, governing)
        if to_decode > limits.max_decoded_frames:
            raise VideoError(
                f"reaching the sampled frames means decoding {to_decode} frames (keyframes are far apart), over the "
                f"limit of {limits.max_decoded_frames} (--max-video-decoded-frames); ask for fewer frames or a "
                "shorter range"
            )
        return VideoPlan(width, height, int(first.rotation), duration, _codec_name(stream), frames, to_decode)


def _frames_to_decode(picked: list[int], governing: list[int]) -> int:
    """Frames the reader decodes for these targets: from a keyframe when one lies past its position."""
    position = -1  # the last frame decoded
    total = 0
    for j in picked:
        start = governing[j] if governing[j] > position else position + 1
        total += j - start + 1
        position = j
    return total


def decode_frames(
    data: bytes, plan: VideoPlan, check_wanted: Callable[[], None] = lambda: None
) -> Iterator[Image.Image]:
    """The plan's frames as upright RGB images, in order; `check_wanted` runs after every decoded frame
    (the ones skipped on the way included) and raises to stop."""
    with ExitStack() as stack:
        container = stack.enter_context(_open(data))
        stack.enter_context(_ffmpeg_errors_are_the_clips())
        stream = _decoding_stream(container)
        reader: _Reader | None = None
        seekable = True
        for target in plan.frames:
            if reader is None or (seekable and target.keyframe_pts > reader.position):
                container.seek(target.keyframe_pts, stream=stream, backward=True, any_frame=False)
                reader = _Reader(_frames(container, stream), check_wanted)
            frame = reader.frame_at(target.pts)
            if frame is None:
                # The seek landed past the target (some containers, e.g. MPEG-TS, seek by estimate): read
                # this clip from its start instead, without seeking again.
                seekable = False
                container = stack.enter_context(_open(data))
                stream = _decoding_stream(container)
                reader = _Reader(_frames(container, stream), check_wanted)
                frame = reader.frame_at(target.pts)
                if frame is None:
                    raise VideoError("the clip's first frame comes after its sampled frames (inconsistent timestamps)")
            yield _upright(frame, plan.rotation)


def _decoding_stream(container: Any) -> Any:
    stream = _video_stream(container)
    stream.codec_context.thread_count = 1  # one process of the pool is one core
    return stream


class _Reader:
    """Decoded frames in order, with the frame read past a target kept for the next target."""

    def __init__(self, frames: Iterator[Any], check_wanted: Callable[[], None]) -> None:
        self._frames = frames
        self._check_wanted = check_wanted
        self._ahead: Any = None
        self.position = -(1 << 62)  # pts of the last frame taken from the decoder

    def _next(self) -> Any:
        if self._ahead is not None:
            frame, self._ahead = self._ahead, None
            return frame
        for frame in self._frames:
            self._check_wanted()
            ts = frame.pts if frame.pts is not None else frame.dts
            if ts is not None:
                self.position = ts
                return frame
        return None

    def frame_at(self, pts: int) -> Any:
        """The frame with this timestamp or, if the decoder lost it, the last one before it; None when the
        reader's first frame is already past it (a seek that overshot)."""
        fresh = self.position == -(1 << 62)
        last = None
        while (frame := self._next()) is not None:
            ts = frame.pts if frame.pts is not None else frame.dts
            if ts == pts:
                return frame
            if ts > pts:
                self._ahead = frame
                if last is None and fresh:
                    return None
                return last if last is not None else frame
            last = frame
        if last is None:
            raise VideoError("the clip ends before its sampled frames (truncated?)")
        return last


def _upright(frame: Any, rotation: int) -> Image.Image:
    image = frame.to_image()  # RGB24 through swscale, in the frame's own colour space
    turns = round(rotation / 90) % 4  # counter-clockwise quarter turns, as ffmpeg's autorotate applies
    if turns:
        image = image.rotate(90 * turns, expand=True)
    return image.convert("RGB")
