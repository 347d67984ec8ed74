"""Video benchmark: a clip sent as a video next to the same frames sent as images.

    make bench-video                                  # embedded default model, 16 frames of a 720p clip
    .venv/bin/python bench/video.py --model ~/.cache/visionchat-peers/ckpt-phi35v-l256   # full CLIP tower

For each repetition a fresh 720p H.264 clip (24 fps, CRF 23, a keyframe every 2 s, --seconds long: a
slow pan over a photograph with a little sensor noise, so that both the codec and the image formats see
natural content; each repetition pans elsewhere so no cache helps) goes to a real server two ways, one
after the other:
  video:  Generate with the clip and num_frames = --frames (the server plans, seeks, decodes);
  images: Generate with the same sampled frames, decoded by the client and sent as JPEG (quality 90)
          and as PNG.
Reported: bytes on the wire (serialized request) and time to first token of each, as ratios to the
video; the server's decode time per sampled frame (video_decode_seconds over frames sampled: seeking,
decoding, colour conversion, HD transform) and, in this process, PyAV alone (plan + decode).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import av
import grpc
import numpy as np
from PIL import Image
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from harness import TINY_MODEL, ServerProcess, generate_request  # noqa: E402

from service.processor.video import VideoLimits, VideoOptions, decode_frames, plan_video  # noqa: E402

OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
PROMPT = "Summarize what happens in this video."
PHOTO = ROOT / "tests" / "fixtures" / "golden" / "images" / "A_640x480.png"


def panning_clip(seconds: int, width: int, height: int, seed: int) -> bytes:
    """A pan across an enlarged photograph, with noise, encoded as H.264 (CRF 23, keyframe every 2 s)."""
    rng = np.random.default_rng(seed)
    scene = np.asarray(Image.open(PHOTO).convert("RGB").resize((width * 2, height * 2), Image.Resampling.BICUBIC))
    frames = seconds * 24
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=24, options={"crf": "23", "preset": "veryfast", "g": "48"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        y0 = int(rng.integers(0, height))
        for i in range(frames):
            x = int((seed * 97 + i * width / frames) % width)
            view = scene[y0 : y0 + height, x : x + width].astype(np.int16)
            noisy = np.clip(view + rng.integers(-3, 4, view.shape), 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def ttft(stub: pb_grpc.VisionChatServiceStub, request: pb.GenerateRequest) -> float:
    start = time.perf_counter()
    first = None
    for r in stub.Generate(request, timeout=1800):
        if first is None and r.HasField("delta") and r.delta.tokens:
            first = time.perf_counter() - start
    assert first is not None
    return first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    limits = VideoLimits(
        max_frames=64, max_pixels=1 << 26, max_seconds=3600, max_decoded_frames=100_000, default_frames=8
    )
    options = VideoOptions(num_frames=args.frames, num_crops=args.num_crops)

    server = ServerProcess(
        [
            "--model",
            args.model,
            "--kv-cache-memory",
            "512MiB",
            "--max-context-tokens",
            "65536",
            "--max-images",
            "64",
            "--max-total-image-bytes",
            "512MiB",
            "--max-receive-message-bytes",
            "512MiB",
        ]
    ).start(timeout=600)
    rows: dict[str, list[float]] = {k: [] for k in ("video", "jpeg", "png", "pyav")}
    sizes: dict[str, int] = {}
    try:
        with grpc.insecure_channel(server.address, options=OPTIONS) as ch:
            stub = pb_grpc.VisionChatServiceStub(ch)
            # Warm-up: the first requests pay for lazy imports and allocations on every side.
            warm = panning_clip(2, width, height, seed=1000)
            ttft(stub, video_request(warm, args.frames, args.num_crops))
            decoded0 = server.metric("visionchat_video_decode_seconds_sum")
            sampled0 = server.metric("visionchat_video_frames_sampled_total")
            for rep in range(args.reps):
                clip = panning_clip(args.seconds, width, height, seed=rep)
                start = time.perf_counter()
                plan = plan_video(clip, options, limits)
                frames = list(decode_frames(clip, plan))
                rows["pyav"].append((time.perf_counter() - start) / len(frames))
                video = video_request(clip, args.frames, args.num_crops)
                jpeg = generate_request(
                    PROMPT, [encoded(f, "JPEG") for f in frames], num_crops=args.num_crops, max_new_tokens=4
                )
                png = generate_request(
                    PROMPT, [encoded(f, "PNG") for f in frames], num_crops=args.num_crops, max_new_tokens=4
                )
                sizes = {"video": video.ByteSize(), "jpeg": jpeg.ByteSize(), "png": png.ByteSize()}
                for name, request in (("video", video), ("jpeg", jpeg), ("png", png)):
                    request.sampling.ignore_eos = True
                    request.messages[0].text = f"{PROMPT} ({name} {rep})"  # no prefix-cache sharing between them
                    rows[name].append(ttft(stub, request))
            per_frame = (server.metric("visionchat_video_decode_seconds_sum") - decoded0) / max(
                server.metric("visionchat_video_frames_sampled_total") - sampled0, 1
            )
    finally:
        server.stop()

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\n{args.frames} frames of a {args.seconds} s {width}x{height} H.264 clip (24 fps, CRF 23, keyframe every 2 s), "
        f"num_crops {args.num_crops}, model {Path(args.model).name}, median of {args.reps}:\n"
    )
    print("| sent as | bytes on the wire | vs video | TTFT (s) | vs video |")
    print("|---|---|---|---|---|")
    for name, label in (
        ("video", "the clip (video)"),
        ("jpeg", "the frames as JPEG q90"),
        ("png", "the frames as PNG"),
    ):
        print(
            f"| {label} | {sizes[name]:,} | {sizes[name] / sizes['video']:.1f}× | {med[name]:.2f} | "
            f"{med[name] / med['video']:.2f}× |"
        )
    print(
        f"\nserver decode + HD transform per sampled frame: {per_frame * 1000:.0f} ms; "
        f"PyAV alone (plan + seek + decode) per sampled frame: {med['pyav'] * 1000:.1f} ms"
    )
    return 0


def video_request(clip: bytes, frames: int, num_crops: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT, video_indices=[0])],
        videos=[pb.Video(data=clip, options=pb.VideoOptions(num_frames=frames, num_crops=num_crops))],
        sampling=pb.SamplingParams(max_new_tokens=4, ignore_eos=True),
    )


if __name__ == "__main__":
    sys.exit(main())
