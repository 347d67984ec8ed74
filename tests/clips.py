"""Small video clips made with PyAV at test time: a moving square on a colour that encodes the frame number.

Frame i is filled with the colour `frame_levels(i)` and a white square moves with i, so a decoded frame
says which frame it is even after lossy compression (`frame_number`)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image

# Frame i is coded as red level 10 * (i % 25) and blue level 40 * (i // 25): steps that survive lossy
# codecs, distinct for 175 frames.
RED_STEP, BLUE_STEP, BASE = 10, 40, 25


def frame_levels(i: int) -> tuple[int, int]:
    return RED_STEP * (i % BASE), BLUE_STEP * ((i // BASE) % 7)  # distinct for 175 frames, then repeating


def frame_pixels(i: int, width: int, height: int) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0], img[..., 2] = frame_levels(i)
    side = max(2, min(width, height) // 4)
    x = (i * 3) % max(1, width - side)
    img[:side, x : x + side] = 255
    return img


def frame_number(image: Image.Image, count: int) -> int:
    """Which frame (0 .. count-1) a decoded frame is: the red and blue levels of its bottom-left corner."""
    array = np.asarray(image.convert("RGB")).astype(np.float64)
    h, w = array.shape[:2]
    corner = array[h - h // 4 :, : w // 4]
    red, blue = corner[..., 0].mean(), corner[..., 2].mean()
    return min(range(count), key=lambda i: abs(frame_levels(i)[0] - red) + abs(frame_levels(i)[1] - blue))


def make_clip(
    fmt: str = "mp4",
    codec: str = "libx264",
    frames: int = 24,
    fps: int = 12,
    size: tuple[int, int] = (64, 48),
    pts_ms: Sequence[int] | None = None,
    rotation: int | None = None,
    gop: int | None = None,
    audio: bool = False,
    first: int = 0,
) -> bytes:
    """An encoded clip. `pts_ms` gives each frame's time in milliseconds (variable frame rate); `first`
    shifts the frame contents (frame i looks like frame i + first of the default clip)."""
    width, height = size
    options = {"preset": "ultrafast"} if codec == "libx264" else {}
    if codec.startswith("libvpx"):
        options = {"deadline": "realtime", "cpu-used": "8"}
    if gop is not None:
        options["g"] = str(gop)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = width, height
        if codec in ("mpeg4", "mpeg2video"):
            stream.bit_rate = 4_000_000  # their default (200 kb/s) blurs the frame colours together
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = out.add_stream("aac", rate=48000, layout="mono") if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i + first, width, height), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            _mux_silence(out, sound)
    return buf.getvalue()


def make_undecodable(frames: int = 24, fps: int = 12) -> bytes:
    """A well-formed MP4 whose H.264 packets are random bytes: the container reads, no frame decodes."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(frames):
            packet = av.Packet(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, fps)
            packet.is_keyframe = i == 0
            out.mux(packet)
    return buf.getvalue()


def _mux_silence(out: av.container.OutputContainer, sound: av.audio.stream.AudioStream) -> None:
    """20 frames (0.43 s) of mono silence through `sound` into `out`."""
    for k in range(20):
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = 48000, k * 1024, Fraction(1, 48000)
        out.mux(sound.encode(chunk))
    out.mux(sound.encode(None))


def make_audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        _mux_silence(out, out.add_stream("aac", rate=48000, layout="mono"))
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
