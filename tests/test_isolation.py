"""One heavy or broken caller never stalls the others: cheap checks first, preprocessing in a bounded
pool, pixels computed once outside the workers, stalled and dead workers caught, uploads bounded.

Real servers, real worker processes, real gRPC clients."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import TINY_MODEL, ServerProcess, collect, generate_request, image_bytes, user
from PIL import Image
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

SINGLE_ARGS = [
    "--model", str(TINY_MODEL), "--dtype", "float32", "--kv-cache-memory", "48MiB",
    "--max-image-pixels", "2000000", "--max-context-tokens", "8192",
    "--preprocess-workers", "1", "--max-preprocess-queue", "1",
    "--upload-idle-timeout", "2", "--max-concurrent-uploads", "2",
]


@pytest.fixture(scope="module")
def single():  # type: ignore[no-untyped-def]
    proc = ServerProcess(SINGLE_ARGS).start()
    yield proc
    proc.stop()


def channel(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])


def code_and_details(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def noise_jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


# --- cheap checks before heavy work -------------------------------------------------------------------


def test_oversize_text_is_refused_from_its_byte_length_without_tokenizing(single: ServerProcess) -> None:
    text = "lorem ipsum dolor sit amet " * 300_000  # 8.1 MB: at least 8.1e6 / (bytes per token) tokens
    with channel(single) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        for call in (
            lambda: collect(stub.Generate(generate_request(text, max_new_tokens=4), timeout=60)),
            lambda: stub.CountTokens(pb.CountTokensRequest(messages=[user(text)]), timeout=60),
        ):
            code, details = code_and_details(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            # "at least": the bound from the byte length; a tokenized prompt says "the prompt is N tokens".
            assert details.startswith("messages: the prompt is at least") and "context limit is 8192" in details, details
        assert single.metric("visionchat_preprocess_queue_requests") == 0
        # A prompt just under the bound is tokenized (in the pool: it is long) and gets the exact count.
        near = "word " * 2000
        count = stub.CountTokens(pb.CountTokensRequest(messages=[user(near)]), timeout=60)
        assert 2000 <= count.prompt_tokens < 8192


def test_image_header_beyond_the_pixel_limit_is_refused_without_decoding(single: ServerProcess) -> None:
    big = Image.new("RGB", (2000, 1001), (10, 20, 30))  # 2.002e6 pixels > --max-image-pixels 2e6; a tiny PNG
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    decoded_before = single.metric("visionchat_preprocess_images_total")
    with channel(single) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        code, details = code_and_details(lambda: collect(stub.Generate(generate_request("What?", [buf.getvalue()]), timeout=60)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "2000x1001" in details and "limit 2000000" in details, details
        code, details = code_and_details(
            lambda: stub.CountTokens(pb.CountTokensRequest(messages=[user("What?", 0)], images=[buf.getvalue()]), timeout=60)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "too many pixels" in details
    assert single.metric("visionchat_preprocess_images_total") == decoded_before


def test_full_preprocessing_queue_sheds_and_text_is_still_served(single: ServerProcess) -> None:
    # One pool process, a queue of one: concurrent large images beyond the first are shed at once with
    # RetryInfo, while a short text prompt (tokenized inline) is served meanwhile.
    images = [noise_jpeg(1900, 1000, seed) for seed in range(6)]
    results: list[object] = []

    def one(data: bytes) -> None:
        with channel(single) as ch:
            try:
                collect(pb_grpc.VisionChatServiceStub(ch).Generate(generate_request("Describe.", [data], num_crops=16, max_new_tokens=2), timeout=120))
                results.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                results.append(err)

    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        futures = [pool.submit(one, data) for data in images]
        with channel(single) as ch:
            ids, _, fin = collect(pb_grpc.VisionChatServiceStub(ch).Generate(generate_request("Hello there.", max_new_tokens=3, ignore_eos=True), timeout=60))
        assert len(ids) == 3
        for f in futures:
            f.result()
    shed = [r for r in results if isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert grpc.StatusCode.OK in results and shed, results
    assert all(isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in results if r != grpc.StatusCode.OK)
    assert "--max-preprocess-queue" in shed[0].details()
    status = rpc_status.from_call(shed[0])  # type: ignore[arg-type]
    assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    single.wait_idle()
    assert single.metric("visionchat_pixel_memory_bytes") == 0


def test_workers_never_decode_and_the_same_image_is_encoded_once(single: ServerProcess) -> None:
    image = image_bytes("B_1024x300")
    tiles = 1 + 3 * 1  # B at num_crops 4: a 1x3 grid of sub-crops plus the global view
    decoded = single.metric("visionchat_preprocess_images_total")
    tiles_before = single.metric("visionchat_vision_tiles_total")
    hits = single.metric("visionchat_encoder_cache_hits_total")
    # Different text before the image, so its KV is not a prefix-cache hit: only the encoder cache can help.
    first = generate_request("First, a question about this picture: <|image_1|>", [image], num_crops=4, max_new_tokens=6, ignore_eos=True)
    second = generate_request("And now something else entirely: <|image_1|>", [image], num_crops=4, max_new_tokens=6, ignore_eos=True)
    with channel(single) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        collect(stub.Generate(first, timeout=60))
        cached_ids, _, fin = collect(stub.Generate(second, timeout=60))
    assert fin.usage.cached_tokens < 16  # nothing of the image came from the prefix cache
    assert single.metric("visionchat_vision_tiles_total") - tiles_before == tiles
    assert single.metric("visionchat_encoder_cache_hits_total") - hits == 1
    assert single.metric("visionchat_preprocess_images_total") - decoded == 2
    assert single.metric("visionchat_worker_image_decodes_total") == 0
    # The same request on a server that never saw the image: the same tokens.
    fresh = ServerProcess(["--model", str(TINY_MODEL), "--dtype", "float32", "--kv-cache-memory", "16MiB"]).start()
    try:
        with channel(fresh) as ch:
            fresh_ids, _, _ = collect(pb_grpc.VisionChatServiceStub(ch).Generate(second, timeout=60))
    finally:
        fresh.stop()
    assert cached_ids == fresh_ids


# --- malformed requests, uploads ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kind", "payload"),
    [
        ("Generate", "unary_stream", b"\x0a\x05\x12\x03\xff\xfe\xfd"),  # messages[0].text is not UTF-8
        ("Generate", "unary_stream", b"\xff\xff\xff\xff"),  # not protobuf at all
        ("CountTokens", "unary_unary", b"\x0a\x05\x12\x03\xff\xfe\xfd"),
        ("GetModelInfo", "unary_unary", b"\x0a\xff"),
        ("Chat", "stream_stream", b"\x0a\x07\x0a\x05\x12\x03\xc3\x28\x41"),  # ChatStart with bad UTF-8
    ],
)
def test_corrupt_request_bytes_are_invalid_argument(single: ServerProcess, method: str, kind: str, payload: bytes) -> None:
    with channel(single) as ch:
        call = getattr(ch, kind)(f"/visionchat.v1.VisionChatService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        if kind == "unary_unary":
            code, details = code_and_details(lambda: call(payload, timeout=10))
        elif kind == "unary_stream":
            code, details = code_and_details(lambda: list(call(payload, timeout=10)))
        else:
            code, details = code_and_details(lambda: list(call(iter([payload]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "is not a valid visionchat.v1." in details


def test_long_request_id_is_refused(single: ServerProcess) -> None:
    req = generate_request("Hi", max_new_tokens=2)
    req.request_id = "x" * 300
    with channel(single) as ch:
        code, details = code_and_details(lambda: collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id:") and "256" in details


def _stalled_upload(hold: threading.Event):  # type: ignore[no-untyped-def]
    yield pb.ChatRequest(start=pb.ChatStart(messages=[user("What is this?", 0)], image_count=1))
    yield pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=0, data=image_bytes("C_200x900")[:1000]))
    hold.wait(30)  # then nothing: the upload stalls


def test_stalled_uploads_time_out_and_are_capped(single: ServerProcess) -> None:
    hold = threading.Event()
    outcomes: list[grpc.StatusCode] = []

    def upload() -> None:
        with channel(single) as ch:
            try:
                collect(pb_grpc.VisionChatServiceStub(ch).Chat(_stalled_upload(hold), timeout=30))
            except grpc.RpcError as err:
                outcomes.append(err.code())

    try:
        threads = [threading.Thread(target=upload) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while single.metric("visionchat_uploads_in_progress") < 2 and time.time() < deadline:
            time.sleep(0.05)
        # --max-concurrent-uploads 2: a third upload is refused at once.
        with channel(single) as ch:
            code, details = code_and_details(lambda: collect(pb_grpc.VisionChatServiceStub(ch).Chat(_stalled_upload(hold), timeout=30)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-uploads" in details
        start = time.time()
        for t in threads:
            t.join(20)
        # --upload-idle-timeout 2: both stalled uploads end well before the client's 30 s deadline.
        assert outcomes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2 and time.time() - start < 10
    finally:
        hold.set()
    assert single.metric("visionchat_uploads_in_progress") == 0


def test_chunk_after_end_of_input_is_an_error(single: ServerProcess) -> None:
    def messages():  # type: ignore[no-untyped-def]
        yield pb.ChatRequest(start=pb.ChatStart(messages=[user("Count to three.")], sampling=pb.SamplingParams(max_new_tokens=200, ignore_eos=True)))
        yield pb.ChatRequest(end_of_input=pb.EndOfInput())
        yield pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=0, data=b"late"))

    with channel(single) as ch:
        code, details = code_and_details(lambda: collect(pb_grpc.VisionChatServiceStub(ch).Chat(messages(), timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("end_of_input:"), details
    single.wait_idle()


# --- stalled and dead workers --------------------------------------------------------------------------

PAIR_ARGS = ["--model", str(TINY_MODEL), "--dtype", "float32", "--devices", "cpu,cpu", "--kv-cache-memory", "16MiB"]
PROMPTS = [f"Request number {i}: tell me about the sea and the moon." for i in range(6)]


def greedy(address: str, prompt: str) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        ids, _, fin = collect(pb_grpc.VisionChatServiceStub(ch).Generate(generate_request(prompt, max_new_tokens=12, ignore_eos=True), timeout=120))
    assert fin.finish_reason == pb.FINISH_REASON_LENGTH
    return ids


@pytest.fixture(scope="module")
def reference(single: ServerProcess) -> list[list[int]]:
    return [greedy(single.address, p) for p in PROMPTS]


def _run_all(address: str) -> list[object]:
    def one(prompt: str) -> object:
        try:
            return greedy(address, prompt)
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def _worker_states(server: ServerProcess) -> list[bool]:
    return [w.alive for w in server.model_info().workers]


def test_stopped_worker_is_caught_its_requests_move_and_it_comes_back(reference: list[list[int]]) -> None:
    proc = ServerProcess([*PAIR_ARGS, "--worker-stall-timeout", "3"]).start()
    try:
        worker0 = proc.worker_pids()[0]
        os.kill(worker0, signal.SIGSTOP)  # alive but not stepping
        start = time.time()
        results = _run_all(proc.address)
        # Requests routed to the stopped worker had produced nothing: they finished on the other one.
        assert results == reference
        assert time.time() - start < 60
        assert proc.metric("visionchat_worker_stalls_total", worker="worker0") == 1
        assert proc.metric("visionchat_worker_restarts_total", worker="worker0") == 1
        assert proc.metric("visionchat_request_success_total", worker="worker1") == len(PROMPTS)
        # The watchdog killed it; it restarts and serves again.
        proc.wait_idle(timeout=120)
        assert _worker_states(proc) == [True, True]
        assert proc.worker_pids()[0] != worker0 or not os.path.exists(f"/proc/{worker0}")
    finally:
        proc.stop()


def test_worker_killed_before_first_token_is_invisible_to_the_client(reference: list[list[int]]) -> None:
    proc = ServerProcess([*PAIR_ARGS, "--worker-stall-timeout", "60"]).start()
    try:
        worker0 = proc.worker_pids()[0]
        os.kill(worker0, signal.SIGSTOP)  # holds its requests before their first token...
        out: list[object] = []
        runner = threading.Thread(target=lambda: out.extend(_run_all(proc.address)))
        runner.start()
        def settled() -> bool:  # the others are done; those on the stopped worker wait for a first token
            stuck = proc.metric("visionchat_num_requests_waiting_frontend")
            return stuck >= 1 and stuck + proc.metric("visionchat_request_success_total", worker="worker1") == len(PROMPTS)

        deadline = time.time() + 30
        while time.time() < deadline and not settled():
            time.sleep(0.05)
        assert settled()
        os.kill(worker0, signal.SIGKILL)  # ...then dies
        runner.join(120)
        assert out == reference
        assert proc.metric("visionchat_worker_stalls_total") == 0
        assert proc.metric("visionchat_worker_restarts_total", worker="worker0") == 1
        proc.wait_idle(timeout=120)
    finally:
        proc.stop()
