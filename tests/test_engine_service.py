"""The engine through the real server: continuous batching, chunked prefill, preemption, several
workers, memory limits, worker crashes and load shedding."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import TINY_MODEL, ServerProcess, collect, generate_request, image_bytes, stream_text_until
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

IMAGES = ["A_640x480", "B_1024x300", "C_200x900"]
WORDS = "the sea is calm tonight and the moon lies fair upon the straits on the french coast".split()


def mixed_requests(n: int) -> list[pb.GenerateRequest]:
    """Requests of different sizes: text prompts of varied length, some with one or two images."""
    reqs = []
    for i in range(n):
        text = " ".join(WORDS[: 3 + (i * 7) % len(WORDS)] * (1 + i % 4))
        images = [image_bytes(IMAGES[i % 3])] if i % 3 == 0 else []
        if i % 8 == 5:
            images = [image_bytes(IMAGES[0]), image_bytes(IMAGES[2])]
        reqs.append(generate_request(text, images, num_crops=(i % 4) + 1 if images else None, max_new_tokens=8 + i % 13, ignore_eos=True))
    return reqs


def run(address: str, req: pb.GenerateRequest, timeout: float = 300) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        ids, _, fin = collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=timeout))
    assert fin.finish_reason == pb.FINISH_REASON_LENGTH
    return ids


def run_concurrently(address: str, reqs: list[pb.GenerateRequest]) -> list[list[int]]:
    with ThreadPoolExecutor(max_workers=len(reqs)) as pool:
        return list(pool.map(lambda r: run(address, r), reqs))


@pytest.fixture(scope="module")
def alone_server():  # type: ignore[no-untyped-def]
    proc = ServerProcess(["--model", str(TINY_MODEL), "--kv-cache-memory", "64MiB"]).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(alone_server: ServerProcess) -> tuple[list[pb.GenerateRequest], list[list[int]]]:
    reqs = mixed_requests(32)
    return reqs, [run(alone_server.address, r) for r in reqs]


def test_32_concurrent_equal_alone_with_chunked_prefill(alone_server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    reqs, alone = reference
    assert run_concurrently(alone_server.address, reqs) == alone
    alone_server.wait_idle()


def hog_requests() -> list[pb.GenerateRequest]:
    """Four requests of ~200 prompt + 600 generated tokens (50 KV blocks each at the end)."""
    return [
        generate_request(" ".join(WORDS[i:] + WORDS[:i]) * 12, max_new_tokens=600, ignore_eos=True) for i in range(4)
    ]


def test_two_workers_tiny_pool_preemptions_and_chunking_keep_tokens(alone_server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    reqs, alone = reference
    hogs = hog_requests()
    hogs_alone = [run(alone_server.address, r) for r in hogs]
    # 85 blocks (~1.3k tokens) of KV per worker; prefill in 64-token chunks. The four hogs, sent first, land two
    # per worker or three and one, and each pair needs 100 blocks by the end of its decoding: whatever the
    # timing, running sequences outgrow the pool and the newest is preempted and recomputed.
    proc = ServerProcess(
        ["--model", str(TINY_MODEL), "--devices", "cpu,cpu", "--kv-cache-memory", "4MiB",
         "--max-num-batched-tokens", "64", "--max-num-seqs", "16"]
    ).start()
    try:
        assert run_concurrently(proc.address, hogs + reqs) == hogs_alone + alone
        assert proc.metric("visionchat_num_preemptions_total") > 0
        served = {w: proc.metric("visionchat_request_success_total", worker=w) for w in ("worker0", "worker1")}
        assert all(v > 0 for v in served.values()), served
        info = proc.wait_idle()
        assert len(info.workers) == 2
    finally:
        assert proc.stop() == 0


def test_twenty_frames_complete_while_others_stream_and_too_big_is_refused() -> None:
    # 20 frames at num_crops=4 of a 640x480 image: 20 * 757 image tokens, ~15.2k tokens of KV.
    # The pool holds ~18.6k tokens (fp32 tiny model: 3 KiB per token).
    proc = ServerProcess(
        ["--model", str(TINY_MODEL), "--kv-cache-memory", "56MiB", "--max-images", "40", "--max-total-image-bytes", "64MiB"]
    ).start()
    try:
        frames = [image_bytes("A_640x480")] * 20
        big = generate_request("Describe what happens across these frames.", frames, num_crops=4, max_new_tokens=4, ignore_eos=True)
        text_times: list[float] = []
        big_done = threading.Event()

        # Long enough to outlast the big request (and with it still under the KV pool: 15.2k + 1.5k
        # tokens of ~18.6k, so nothing is preempted); stopped once that is done.
        streamer = threading.Thread(target=stream_text_until, args=(proc, big_done, text_times, 300))
        streamer.start()
        while not text_times:
            time.sleep(0.01)
        sent = time.time()
        with grpc.insecure_channel(proc.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.VisionChatServiceStub(ch)
            responses = stub.Generate(big, timeout=300)
            first = None
            ids: list[int] = []
            fin = None
            for r in responses:
                if r.HasField("delta") and r.delta.tokens and first is None:
                    first = time.time()
                if r.HasField("delta"):
                    ids += [t.token_id for t in r.delta.tokens]
                else:
                    fin = r.finished
            assert fin is not None and fin.usage.image_tokens == 20 * 757 and len(ids) == 4
            assert fin.usage.prompt_tokens > 15000
            # Chunked prefill: the text stream kept getting tokens while the 15k-token prompt was prefilled.
            assert first is not None
            assert sum(1 for t in text_times if sent < t < first) >= 3

            too_big = generate_request("And these?", [image_bytes("A_640x480")] * 30, num_crops=4, max_new_tokens=4)
            with pytest.raises(grpc.RpcError) as info:
                collect(stub.Generate(too_big, timeout=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "KV blocks" in info.value.details() and "pool has" in info.value.details()
        big_done.set()
        streamer.join(300)
        proc.wait_idle()
    finally:
        proc.stop()


def test_only_worker_killed_service_goes_not_serving_until_it_is_back() -> None:
    from grpc_health.v1 import health_pb2

    proc = ServerProcess(["--model", str(TINY_MODEL), "--kv-cache-memory", "16MiB"]).start()
    try:
        os.kill(proc.worker_pids()[0], signal.SIGKILL)
        seen = set()
        deadline = time.time() + 120
        while time.time() < deadline:
            seen.add(proc.health("visionchat.v1.VisionChatService"))
            assert proc.health("") == health_pb2.HealthCheckResponse.SERVING  # liveness: the server heals itself
            if health_pb2.HealthCheckResponse.NOT_SERVING in seen and proc.health("visionchat.v1.VisionChatService") == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.02)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
        proc.wait_serving()
        assert len(run(proc.address, generate_request("hello", max_new_tokens=3, ignore_eos=True))) == 3
    finally:
        proc.stop()


def test_killed_worker_fails_only_its_requests_and_comes_back() -> None:
    # Two workers on one device, the way a GPU or NPU is shared (--workers-per-device).
    args = ["--model", str(TINY_MODEL), "--devices", "cpu", "--workers-per-device", "2", "--kv-cache-memory", "32MiB"]
    proc = ServerProcess(args).start()
    try:
        results: dict[int, object] = {}

        def one(i: int) -> None:
            try:
                results[i] = run(proc.address, generate_request("Write a haiku about the sea. " * (1 + i % 3), max_new_tokens=300, ignore_eos=True))
            except grpc.RpcError as err:
                results[i] = err.code()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        # Wait until both workers run something, then kill worker0 hard.
        deadline = time.time() + 60
        while time.time() < deadline:
            info = proc.model_info()
            if all(w.running_requests > 0 for w in info.workers):
                break
            time.sleep(0.05)
        pids = proc.worker_pids()
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(300)
        codes = list(results.values())
        lost = [c for c in codes if c == grpc.StatusCode.UNAVAILABLE]
        done = [c for c in codes if isinstance(c, list)]
        assert lost and done, codes
        assert len(lost) + len(done) == 8
        assert all(len(c) == 300 for c in done)
        # The worker restarts and serves again.
        proc.wait_idle(timeout=120)
        assert proc.metric("visionchat_worker_restarts_total") == 1
        after = run_concurrently(proc.address, [generate_request("Write a haiku about the sea.", max_new_tokens=5, ignore_eos=True)] * 4)
        assert all(len(a) == 5 for a in after)
        served = {w: proc.metric("visionchat_request_success_total", worker=w) for w in ("worker0", "worker1")}
        assert all(v > 0 for v in served.values()), served
    finally:
        proc.stop()


def test_load_shedding_resource_exhausted_with_retry_info() -> None:
    proc = ServerProcess(
        ["--model", str(TINY_MODEL), "--max-queued-requests", "2", "--max-num-seqs", "1", "--kv-cache-memory", "16MiB"]
    ).start()
    try:
        codes: list[object] = []
        errors: list[grpc.RpcError] = []

        def one(_: int) -> None:
            try:
                run(proc.address, generate_request("Write a haiku about the sea.", max_new_tokens=150, ignore_eos=True))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                errors.append(err)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, range(8)))
        assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        shed = next(e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        status = rpc_status.from_call(shed)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
        assert retry.retry_delay.seconds + retry.retry_delay.nanos > 0
        proc.wait_idle()
    finally:
        proc.stop()
