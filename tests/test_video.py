"""Videos: frames chosen by the documented formula, decoded with seeking, served exactly as images.

Clips are made with PyAV at test time (tests/clips.py): frame i is filled with a red level that
encodes i, so a decoded frame says which frame it is. The formula (README, "Video"): with frame
times t_j from the first frame and D = t_last + the last frame's duration, the range is [a, b) with
b = min(end, D); target i of N is tau_i = a + (i + 1/2)(b - a)/N and takes the last frame with
t_j <= tau_i; a frame picked twice is kept once."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from clips import frame_number, make_audio_only, make_clip, make_undecodable, png
from harness import TINY_MODEL, ServerProcess, collect, generate_request, node_chat_client, stream_text_until
from PIL import Image
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

from service.processor.video import VideoLimits, VideoOptions, decode_frames, plan_video

LIMITS = VideoLimits(max_frames=64, max_pixels=1 << 24, max_seconds=3600, max_decoded_frames=20_000, default_frames=8)
PROMPT = "Describe what happens."

# 24 frames at 12 fps: t_j = j / 12, D = 2 s.
CONTAINERS = [
    ("mp4", "libx264"),
    ("matroska", "libx264"),
    ("webm", "libvpx-vp9"),
    ("avi", "mpeg4"),
    ("mpegts", "mpeg2video"),
    ("mov", "mjpeg"),
]
FORMULA_CASES = [
    (VideoOptions(num_frames=4), [3, 9, 15, 21]),  # tau = 0.25, 0.75, 1.25, 1.75
    (VideoOptions(frames_per_second=2), [3, 9, 15, 21]),  # N = floor(2 s * 2 fps) = 4
    (VideoOptions(num_frames=2, start_seconds=0.5, end_seconds=1.5), [9, 15]),  # tau = 0.75, 1.25
    (VideoOptions(num_frames=5, end_seconds=99), [2, 7, 12, 16, 21]),  # b = D; tau = 0.2, 0.6, 1, 1.4, 1.8
    (VideoOptions(num_frames=30), list(range(24))),  # more targets than frames: every frame, once
]


def reference_indices(times: list[float], duration: float, n: int, start: float = 0.0) -> list[int]:
    out: list[int] = []
    for i in range(n):
        tau = start + (i + 0.5) * (duration - start) / n
        j = max(k for k, t in enumerate(times) if t <= tau + 1e-9)
        if j not in out:
            out.append(j)
    return out


@pytest.mark.parametrize(("fmt", "codec"), CONTAINERS)
def test_sampled_frames_and_times_follow_the_formula_in_every_container(fmt: str, codec: str) -> None:
    clip = make_clip(fmt, codec, frames=24, fps=12)
    for options, expected in FORMULA_CASES:
        plan = plan_video(clip, options, LIMITS)
        assert plan.duration_seconds == pytest.approx(2.0, abs=1e-3)
        assert [f.index for f in plan.frames] == expected, options
        assert [f.seconds for f in plan.frames] == pytest.approx([j / 12 for j in expected], abs=1e-3)
        assert [frame_number(image, 24) for image in decode_frames(clip, plan)] == expected


def test_variable_frame_rate_samples_by_each_frames_own_time() -> None:
    pts_ms = [0, 40, 80, 500, 520, 1000, 1700, 1750]
    clip = make_clip("mp4", frames=8, pts_ms=pts_ms)
    plan = plan_video(clip, VideoOptions(num_frames=4), LIMITS)
    times = [p / 1000 for p in pts_ms]
    assert 1.75 < plan.duration_seconds <= 2.0  # the last frame lasts until the clip's end
    expected = reference_indices(times, plan.duration_seconds, 4)
    assert [f.index for f in plan.frames] == expected
    assert expected != [1, 3, 5, 7]  # what spreading over frame indices instead of time would pick
    assert [f.seconds for f in plan.frames] == pytest.approx([times[j] for j in expected])
    assert [frame_number(image, 8) for image in decode_frames(clip, plan)] == expected


def test_seeking_decodes_from_the_governing_keyframe_only() -> None:
    clip = make_clip("mp4", frames=96, fps=24, gop=12)  # a keyframe every 12 frames
    plan = plan_video(clip, VideoOptions(num_frames=2), LIMITS)  # tau = 1, 3 s: frames 24 and 72, both keyframes
    assert [f.index for f in plan.frames] == [24, 72]
    assert plan.frames_to_decode == 2
    dense = plan_video(make_clip("mp4", frames=96, fps=24, gop=96), VideoOptions(num_frames=2), LIMITS)
    assert dense.frames_to_decode == 73  # one keyframe: decode from frame 0 through 72
    assert [frame_number(image, 96) for image in decode_frames(clip, plan)] == [24, 72]


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_is_applied_so_frames_are_upright(rotation: int) -> None:
    clip = make_clip("mp4", frames=6, fps=6, size=(64, 48), rotation=rotation)
    plan = plan_video(clip, VideoOptions(num_frames=1), LIMITS)
    image = next(decode_frames(clip, plan))
    assert (plan.width, plan.height) == image.size == ((48, 64) if rotation % 180 else (64, 48))
    # The clip's white square sits on its top edge. FFmpeg's autorotate turns a display matrix of +90
    # degrees by 90 counter-clockwise ("transpose=cclock"): the top edge goes to the left.
    edge = {90: image.crop((0, 0, 4, 64)), -90: image.crop((44, 0, 48, 64)), 180: image.crop((0, 44, 64, 48))}[rotation]
    assert np.asarray(edge)[..., 1].max() > 200  # green is only in the white square


# --- through a real server ----------------------------------------------------------------------------

SERVER_ARGS = [
    "--model", str(TINY_MODEL), "--dtype", "float32",
    "--kv-cache-memory", "72MiB",  # ~24.5k tokens of the tiny model's KV
    "--max-context-tokens", "65536",
    "--max-video-frames", "64",
    "--max-video-pixels", "1000000",
    "--max-video-seconds", "60",
    "--max-video-bytes", "4MiB",
    "--max-video-decoded-frames", "2000",
    "--preprocess-workers", "1",
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(SERVER_ARGS).start()
    yield proc
    proc.stop()


def channel(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])


def video(data: bytes, **options: object) -> pb.Video:
    return pb.Video(data=data, options=pb.VideoOptions(**options))  # type: ignore[arg-type]


def video_request(text: str, videos: list[pb.Video], **sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, text=text, video_indices=range(len(videos)))],
        videos=videos,
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def frames_by_plain_pyav(clip: bytes, indices: list[int]) -> list[bytes]:
    """The clip's frames at these presentation positions, decoded front to back by PyAV, as PNGs."""
    with av.open(io.BytesIO(clip)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    return [png(frames[j]) for j in indices]


def test_count_tokens_reports_every_sampled_frame(server: ServerProcess) -> None:
    clip = make_clip("mp4", frames=24, fps=12)
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        counted = stub.CountTokens(
            pb.CountTokensRequest(
                messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT, video_indices=[0])],
                videos=[video(clip, num_frames=4)],
            ),
            timeout=30,
        )
        images = stub.CountTokens(generate_as_count(PROMPT, frames_by_plain_pyav(clip, [3, 9, 15, 21])), timeout=30)
    (info,) = counted.videos
    assert [f.frame_index for f in info.frames] == [3, 9, 15, 21]
    assert [f.timestamp_seconds for f in info.frames] == pytest.approx([0.25, 0.75, 1.25, 1.75])
    per_frame = images.images[0].tokens
    assert [f.tokens for f in info.frames] == [per_frame] * 4 and info.tokens == 4 * per_frame
    assert (info.width, info.height, info.num_crops, info.codec) == (64, 48, 4, "h264")
    assert info.duration_seconds == pytest.approx(2.0)
    assert counted.video_tokens == counted.image_tokens == images.image_tokens
    assert counted.prompt_tokens == images.prompt_tokens


def generate_as_count(text: str, images: list[bytes]) -> pb.CountTokensRequest:
    req = generate_request(text, images, num_crops=4)
    return pb.CountTokensRequest(messages=req.messages, images=req.images, image_options=req.image_options)


def test_greedy_tokens_for_a_video_equal_its_frames_sent_as_images(server: ServerProcess) -> None:
    clip = make_clip("matroska", frames=24, fps=12)
    frames = frames_by_plain_pyav(clip, [3, 9, 15, 21])
    sampled = server.metric("visionchat_video_frames_sampled_total")
    decodes = server.metric("visionchat_video_decode_seconds_count")
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        as_images, _, images_fin = collect(
            stub.Generate(generate_request(PROMPT, frames, num_crops=4, max_new_tokens=8, ignore_eos=True), timeout=60)
        )
        as_video, _, fin = collect(
            stub.Generate(video_request(PROMPT, [video(clip, num_frames=4)], max_new_tokens=8, ignore_eos=True), timeout=60)
        )
        # The Chat RPC, the clip uploaded in 1 KiB chunks.
        start = pb.ChatStart(
            messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT, video_indices=[0])],
            videos=[pb.VideoOptions(num_frames=4)],
            sampling=pb.SamplingParams(max_new_tokens=8, ignore_eos=True),
        )
        chunks = [pb.ChatRequest(video_chunk=pb.VideoChunk(video_index=0, data=clip[i : i + 1024])) for i in range(0, len(clip), 1024)]
        requests = [pb.ChatRequest(start=start), *chunks, pb.ChatRequest(end_of_input=pb.EndOfInput())]
        via_chat, _, chat_fin = collect(stub.Chat(iter(requests), timeout=60))
    assert len(as_images) == 8 and as_video == as_images and via_chat == as_images
    assert fin.usage.prompt_tokens == images_fin.usage.prompt_tokens
    assert fin.usage.video_tokens == fin.usage.image_tokens == 4 * 757
    assert [f.frame_index for f in fin.videos[0].frames] == [3, 9, 15, 21] == [f.frame_index for f in chat_fin.videos[0].frames]
    assert server.metric("visionchat_video_frames_sampled_total") - sampled == 8
    assert server.metric("visionchat_video_decode_seconds_count") - decodes == 2
    assert server.metric("visionchat_worker_image_decodes_total") == 0


def test_timestamps_in_prompt_are_the_documented_text(server: ServerProcess) -> None:
    clip = make_clip("mp4", frames=24, fps=12)
    frames = frames_by_plain_pyav(clip, [6, 18])
    # Two frames at t = 0.5 s and 1.5 s become "0.50s: <|image_1|>\n1.50s: <|image_2|>\n" before the text.
    text = f"0.50s: <|image_1|>\n1.50s: <|image_2|>\n{PROMPT}"
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        as_images, _, _ = collect(stub.Generate(generate_request(text, frames, num_crops=4, max_new_tokens=6, ignore_eos=True), timeout=60))
        as_video, _, fin = collect(
            stub.Generate(
                video_request(PROMPT, [video(clip, num_frames=2, timestamps_in_prompt=True)], max_new_tokens=6, ignore_eos=True),
                timeout=60,
            )
        )
    assert as_video == as_images and len(as_video) == 6
    assert [f.timestamp_seconds for f in fin.videos[0].frames] == pytest.approx([0.5, 1.5])


def test_rotated_clip_is_served_upright(server: ServerProcess) -> None:
    clip = make_clip("mp4", frames=12, fps=12, rotation=90)
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        ids, _, fin = collect(stub.Generate(video_request(PROMPT, [video(clip, num_frames=1)], max_new_tokens=4, ignore_eos=True), timeout=60))
        with av.open(io.BytesIO(clip)) as container:
            frame = list(container.decode(video=0))[6]
        upright = frame.to_image().rotate(90, expand=True)  # +90 in the display matrix: 90 counter-clockwise
        as_image, _, _ = collect(stub.Generate(generate_request(PROMPT, [png(upright)], num_crops=4, max_new_tokens=4, ignore_eos=True), timeout=60))
    assert (fin.videos[0].width, fin.videos[0].height) == (48, 64)
    assert ids == as_image


BAD_CLIPS = {
    "empty": (lambda: b"", {}, "videos[0].data", "empty"),
    "garbage": (lambda: bytes(range(256)) * 40, {}, "videos[0]", "not a readable video container"),
    "truncated": (lambda: make_clip("mp4")[:800], {}, "videos[0]", "corrupt or truncated"),
    "png": (lambda: png(Image.new("RGB", (32, 32))), {}, "videos[0]", "not a supported video container"),
    "audio only": (lambda: make_audio_only(), {}, "videos[0]", "no video stream (the file holds only: audio)"),
    "unknown codec": (lambda: make_clip("mp4").replace(b"avc1", b"zzzz"), {}, "videos[0]", "codec is not supported"),
    "no decodable frame": (lambda: make_undecodable(), {}, "videos[0]", "no frame of the clip decodes"),
    "too many pixels": (lambda: make_clip("mp4", frames=2, size=(1280, 800)), {}, "videos[0]", "1280x800 frames exceed the limit of 1000000 pixels"),
    "too long": (lambda: make_clip("mp4", frames=62, fps=1), {}, "videos[0]", "over the limit of 60 s"),
    "start after the end": (lambda: make_clip("mp4"), {"start_seconds": 5.0}, "videos[0]", "start_seconds 5 is outside the clip (0 to 2.000 s)"),
    "too many frames": (lambda: make_clip("mp4"), {"num_frames": 65}, "videos[0]", "65 frames exceed the limit of 64 frames per request"),
    "too high a rate": (lambda: make_clip("mp4"), {"frames_per_second": 100.0}, "videos[0]", "100 frames per second over 2.000 s exceed the limit"),
    "negative rate": (lambda: make_clip("mp4"), {"frames_per_second": -1.0}, "videos[0].options.frames_per_second", ">= 0"),
    "end before start": (lambda: make_clip("mp4"), {"start_seconds": 1.0, "end_seconds": 0.5}, "videos[0].options.end_seconds", "after start_seconds"),
    "num_crops": (lambda: make_clip("mp4"), {"num_crops": 17}, "videos[0].options.num_crops", "between 1 and 16"),
    "too big": (lambda: b"\0" * (4 * 1024 * 1024 + 1), {}, "videos[0]", "exceed the limit of 4194304 bytes per video (--max-video-bytes)"),
}


@pytest.mark.parametrize("case", list(BAD_CLIPS))
def test_bad_clips_are_invalid_argument_naming_the_problem(server: ServerProcess, case: str) -> None:
    make, options, field, message = BAD_CLIPS[case]
    data = make()
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Generate(video_request(PROMPT, [video(data, **options)], max_new_tokens=2), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details() and message in info.value.details(), info.value.details()
        ids, _, _ = collect(stub.Generate(generate_request("Hello.", max_new_tokens=2, ignore_eos=True), timeout=30))
        assert len(ids) == 2  # the server keeps serving


def test_video_references_are_checked(server: ServerProcess) -> None:
    clip = make_clip("mp4")
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        dangling = pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT, video_indices=[1])],
            videos=[video(clip)],
            sampling=pb.SamplingParams(max_new_tokens=1),
        )
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Generate(dangling, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "video" in info.value.details()
        too_many = video_request(PROMPT, [video(clip)] * 5, max_new_tokens=1)
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Generate(too_many, timeout=30))
        assert "5 videos exceed the limit of 4 per request (--max-videos)" in info.value.details()
        # Frames of all videos together are capped too: 2 x 40 > 64.
        with pytest.raises(grpc.RpcError) as info:
            longer = make_clip("mp4", frames=96, fps=24)
            collect(stub.Generate(video_request(PROMPT, [video(longer, num_frames=40, num_crops=1)] * 2, max_new_tokens=1), timeout=30))
        assert "80 sampled frames exceed the limit of 64 per request (--max-video-frames)" in info.value.details()


@pytest.mark.parametrize("num_frames", [32, 64])
def test_dozens_of_frames_complete_while_a_text_stream_keeps_streaming(server: ServerProcess, num_frames: int) -> None:
    # 96 frames of 64x48 at num_crops 1: 313 tokens a frame, 64 frames ~20k tokens of a ~24.5k-token KV pool.
    clip = make_clip("mp4", frames=96, fps=24, gop=24)
    times: list[float] = []
    stop = threading.Event()
    streamer = threading.Thread(target=stream_text_until, args=(server, stop, times))
    streamer.start()
    try:
        while not times:
            time.sleep(0.01)
        sent = time.time()
        first = None
        ids: list[int] = []
        fin = None
        with channel(server) as ch:
            req = video_request(PROMPT, [video(clip, num_frames=num_frames, num_crops=1)], max_new_tokens=4, ignore_eos=True)
            for r in pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=300):
                if r.HasField("delta"):
                    first = first or time.time()
                    ids += [t.token_id for t in r.delta.tokens]
                else:
                    fin = r.finished
        assert fin is not None and len(ids) == 4
        assert len(fin.videos[0].frames) == num_frames and fin.usage.video_tokens == num_frames * 313
        assert first is not None and sum(1 for t in times if sent < t < first) >= 3  # chunked prefill kept it flowing
    finally:
        stop.set()
        streamer.join(300)


def test_a_video_that_no_kv_pool_holds_is_refused_with_numbers_before_decoding(server: ServerProcess) -> None:
    clip = make_clip("mp4", frames=96, fps=24, gop=24)
    decoded = server.metric("visionchat_video_frames_decoded_total")
    with channel(server) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:  # 64 frames x 757 tokens at num_crops 4: ~48.5k tokens
            collect(stub.Generate(video_request(PROMPT, [video(clip, num_frames=64)], max_new_tokens=4), timeout=60))
    details = info.value.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # 64 x 757 = 48448 image tokens and at least one of text: 3029 blocks of 16, in a pool of 1536.
    assert "prompt (48449 tokens)" in details and "needs 3029 KV blocks" in details and "pool has 1536 blocks" in details
    assert server.metric("visionchat_video_frames_decoded_total") == decoded
    # Past the context (65536 here): refused from the plan as well, with the token count.
    long_clip = make_clip("mp4", frames=96, fps=24, gop=24)
    with channel(server) as ch, pytest.raises(grpc.RpcError) as info:
        req = video_request(PROMPT, [video(long_clip, num_frames=64, num_crops=16)], max_new_tokens=4)
        collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=60))
    assert "122944 image tokens (122944 of them video frames)" in info.value.details(), info.value.details()


def test_cancelled_mid_decode_frees_all_pixel_memory_at_once(server: ServerProcess) -> None:
    clip = make_clip("mp4", frames=240, fps=24, size=(1280, 720), gop=240)  # 16 frames take ~2 s to prepare
    decodes = server.metric("visionchat_video_decode_seconds_count")
    folder = Path("/dev/shm") / f"visionchat-{server.proc.pid}" if server.proc else None
    with channel(server) as ch:
        call = pb_grpc.VisionChatServiceStub(ch).Generate(
            video_request(PROMPT, [video(clip, num_frames=16)], max_new_tokens=4), timeout=60
        )
        def drain() -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.CANCELLED

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        deadline = time.time() + 30
        while server.metric("visionchat_pixel_memory_bytes") == 0 and time.time() < deadline:
            time.sleep(0.01)
        held = server.metric("visionchat_pixel_memory_bytes")
        call.cancel()
        cancelled = time.time()
        while server.metric("visionchat_pixel_memory_bytes") > 0 and time.time() < cancelled + 10:
            time.sleep(0.01)
        freed_after = time.time() - cancelled
    assert held == 16 * 5 * 336 * 336 * 3 * 4  # 16 frames x 5 crops of float32 pixels were reserved
    assert server.metric("visionchat_pixel_memory_bytes") == 0 and freed_after < 1.5, freed_after
    assert server.metric("visionchat_video_decode_seconds_count") == decodes  # it was stopped mid-decode
    if folder is not None and folder.is_dir():
        assert list(folder.iterdir()) == []
    server.wait_idle()
    with channel(server) as ch:  # the pool process is free again
        ids, _, _ = collect(
            pb_grpc.VisionChatServiceStub(ch).Generate(video_request(PROMPT, [video(make_clip("mp4"), num_frames=2)], max_new_tokens=2, ignore_eos=True), timeout=60)
        )
    assert len(ids) == 2


# --- clients ------------------------------------------------------------------------------------------


def test_python_client_cli_and_node_client_send_a_clip(server: ServerProcess, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from client import Video, VisionChatClient

    path = tmp_path / "clip.mp4"
    path.write_bytes(make_clip("mp4", frames=24, fps=12))
    with VisionChatClient(server.address) as client:
        result = client.chat(PROMPT, videos=[Video(path, num_frames=4)], max_new_tokens=6, ignore_eos=True, chunk_size=4096)
        inline = client.generate(PROMPT, videos=[Video(path, num_frames=4)], max_new_tokens=6, ignore_eos=True)
        count = client.count_tokens(PROMPT, videos=[Video(path, num_frames=4)])
    assert len(result.token_ids) == 6 and inline.token_ids == result.token_ids
    assert [f.frame_index for f in result.videos[0].frames] == [3, 9, 15, 21]
    assert count.video_tokens == result.usage.video_tokens == 4 * 757
    assert count.prompt_tokens == result.usage.prompt_tokens

    cli = subprocess.run(
        [sys.executable, "-m", "client", "chat", "--server", server.address, "--video", str(path), "--frames", "4",
         "--max-new-tokens", "6", "--ignore-eos", "--json", PROMPT],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["token_ids"] == result.token_ids

    node_chat = node_chat_client()
    proc = subprocess.run(
        [*node_chat, "--server", server.address, "--video", str(path), "--frames", "4",
         "--chunk-size", "4096", "--max-new-tokens", "6", "--ignore-eos", "--json", PROMPT],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == result.token_ids
