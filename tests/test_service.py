"""The gRPC service end to end: real server process, real workers, real clients."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from harness import GOLDEN, ROOT, ServerProcess, collect, generate_request, image_bytes, user
from PIL import Image
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

from client import AsyncVisionChatClient, VisionChatClient

PROMPT_ONE = "<|image_1|>\nDescribe this image in detail."
GOLDEN_A = np.load(GOLDEN / "model_nc4_one_A_640x480.npz")["gen_tokens"].tolist()
GOLDEN_TEXT = np.load(GOLDEN / "model_text_only.npz")["gen_tokens"].tolist()


def chat_stream(start: pb.ChatStart, images: list[bytes], chunk: int = 1 << 20, end: bool = True):  # type: ignore[no-untyped-def]
    yield pb.ChatRequest(start=start)
    for k, data in enumerate(images):
        for i in range(0, len(data), chunk):
            yield pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=k, data=data[i : i + chunk]))
    if end:
        yield pb.ChatRequest(end_of_input=pb.EndOfInput())


@pytest.fixture(scope="module")
def channel(server: ServerProcess):  # type: ignore[no-untyped-def]
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.VisionChatServiceStub:
    return pb_grpc.VisionChatServiceStub(channel)


def test_health_is_serving_after_load(server: ServerProcess) -> None:
    assert server.health("") == health_pb2.HealthCheckResponse.SERVING
    assert server.health("visionchat.v1.VisionChatService") == health_pb2.HealthCheckResponse.SERVING


def test_generate_matches_golden_tokens(stub: pb_grpc.VisionChatServiceStub, server: ServerProcess) -> None:
    req = generate_request(PROMPT_ONE.removeprefix("<|image_1|>\n"), [image_bytes("A_640x480")], num_crops=4, max_new_tokens=16, ignore_eos=True)
    req.messages[0].text = PROMPT_ONE
    ids, text, fin = collect(stub.Generate(req, timeout=60))
    assert ids == GOLDEN_A
    assert fin.finish_reason == pb.FINISH_REASON_LENGTH
    assert fin.usage.prompt_tokens == 775 and fin.usage.image_tokens == 757 and fin.usage.completion_tokens == 16
    assert fin.timings.time_to_first_token_seconds > 0 and fin.timings.total_seconds >= fin.timings.time_to_first_token_seconds
    assert text  # random weights: gibberish, but text


def test_chat_stream_one_image_in_odd_chunks_equals_generate(stub: pb_grpc.VisionChatServiceStub) -> None:
    start = pb.ChatStart(
        messages=[user(PROMPT_ONE, 0)],
        sampling=pb.SamplingParams(max_new_tokens=16, ignore_eos=True),
        image_count=1,
        image_options=pb.ImageOptions(num_crops=4),
    )
    ids, _, fin = collect(stub.Chat(chat_stream(start, [image_bytes("A_640x480")], chunk=12345), timeout=60))
    assert ids == GOLDEN_A
    assert fin.usage.image_tokens == 757


def test_chat_with_three_images_and_default_num_crops(stub: pb_grpc.VisionChatServiceStub) -> None:
    images = [image_bytes(n) for n in ("A_640x480", "B_1024x300", "C_200x900")]
    start = pb.ChatStart(
        messages=[user("Compare these three images.", 0, 1, 2)],
        sampling=pb.SamplingParams(max_new_tokens=8, ignore_eos=True),
        image_count=3,
    )
    ids, _, fin = collect(stub.Chat(chat_stream(start, images), timeout=60))
    # Several images: num_crops defaults to 4 (757 + 601 + 781 tokens, README section 2.1).
    assert fin.usage.image_tokens == 757 + 601 + 781
    assert len(ids) == 8 and fin.usage.completion_tokens == 8


def test_count_tokens_equals_usage(stub: pb_grpc.VisionChatServiceStub) -> None:
    images = [image_bytes("B_1024x300")]
    req = generate_request("What is this?", images, max_new_tokens=2)
    counted = stub.CountTokens(pb.CountTokensRequest(messages=req.messages, images=images), timeout=30)
    _, _, fin = collect(stub.Generate(req, timeout=60))
    assert counted.prompt_tokens == fin.usage.prompt_tokens
    assert counted.image_tokens == fin.usage.image_tokens
    # One image: num_crops defaults to 16.
    assert counted.images[0].num_crops == 16 and counted.images[0].width == 1024 and counted.images[0].height == 300
    assert counted.text_tokens + counted.image_tokens == counted.prompt_tokens


def test_python_clients_equal_raw_rpcs(server: ServerProcess, stub: pb_grpc.VisionChatServiceStub) -> None:
    image = image_bytes("C_200x900")
    kwargs = dict(num_crops=4, max_new_tokens=12, ignore_eos=True)
    with VisionChatClient(server.address) as client:
        chat = client.chat("What is in the picture?", [image], **kwargs)
        gen = client.generate("What is in the picture?", [image], **kwargs)

    async def run_async():  # type: ignore[no-untyped-def]
        async with AsyncVisionChatClient(server.address) as aclient:
            return await aclient.chat("What is in the picture?", [image], **kwargs)

    achat = asyncio.run(run_async())
    raw_ids, raw_text, _ = collect(stub.Generate(generate_request("What is in the picture?", [image], num_crops=4, max_new_tokens=12, ignore_eos=True), timeout=60))
    assert chat.token_ids == gen.token_ids == achat.token_ids == raw_ids
    assert chat.text == gen.text == achat.text == raw_text
    assert chat.finish_reason == "length"


def test_text_only_matches_golden_and_cli_json(server: ServerProcess) -> None:
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-m", "client", "chat", "--server", server.address, "--json",
         "--max-new-tokens", "16", "--ignore-eos", "Write a haiku about the sea."],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == GOLDEN_TEXT
    assert result["finish_reason"] == "length" and result["usage"]["prompt_tokens"] == 16


def test_stop_string_across_tokens_is_cut(stub: pb_grpc.VisionChatServiceStub) -> None:
    base = generate_request("Write a haiku about the sea.", max_new_tokens=16, ignore_eos=True)
    _, full_text, _ = collect(stub.Generate(base, timeout=60))
    # A stop string that straddles the middle of the generated text.
    mid = len(full_text) // 2
    stop = full_text[mid - 2 : mid + 2]
    assert len(stop.strip()) >= 2
    req = generate_request("Write a haiku about the sea.", max_new_tokens=16, ignore_eos=True, stop=[stop])
    _, text, fin = collect(stub.Generate(req, timeout=60))
    assert fin.finish_reason == pb.FINISH_REASON_STOP_STRING
    assert fin.matched_stop == stop
    assert text == full_text[: full_text.find(stop)]
    assert stop not in text


def test_stop_token_and_logprobs(stub: pb_grpc.VisionChatServiceStub) -> None:
    req = generate_request("Write a haiku about the sea.", max_new_tokens=16, stop_token_ids=[GOLDEN_TEXT[3]], logprobs=3)
    ids, _, fin = collect(stub.Generate(req, timeout=60))
    assert ids == GOLDEN_TEXT[:4]
    assert fin.finish_reason == pb.FINISH_REASON_STOP_TOKEN
    for r in stub.Generate(req, timeout=60):
        if r.HasField("delta"):
            for tok in r.delta.tokens:
                assert len(tok.top_logprobs) == 3
                assert tok.top_logprobs[0].token_id == tok.token_id  # greedy picks the top-1
                assert tok.logprob <= 0 and abs(tok.logprob - tok.top_logprobs[0].logprob) < 1e-5


def test_seeded_sampling_is_reproducible(stub: pb_grpc.VisionChatServiceStub) -> None:
    def run(seed: int) -> list[int]:
        req = generate_request("Tell me a story.", max_new_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        return collect(stub.Generate(req, timeout=60))[0]

    assert run(7) == run(7)
    assert run(7) != run(8)


def _large_png(min_bytes: int) -> bytes:
    rng = np.random.default_rng(0)
    side = 1200
    while True:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
        if buf.tell() > min_bytes:
            return buf.getvalue()
        side += 200


def test_image_larger_than_grpc_default_message_limit(stub: pb_grpc.VisionChatServiceStub) -> None:
    data = _large_png(5 << 20)
    start = pb.ChatStart(
        messages=[user("What is this noise?", 0)], sampling=pb.SamplingParams(max_new_tokens=2), image_count=1,
        image_options=pb.ImageOptions(num_crops=1),
    )
    _, _, fin = collect(stub.Chat(chat_stream(start, [data], chunk=1 << 20), timeout=120))
    assert fin.usage.image_tokens == (1 + 1) * 144 + 1 + 2 * 12
    assert fin.usage.completion_tokens == 2


# --- bad input -------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    data = image_bytes("C_200x900")
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 9000), 255).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _tiff_cmyk_ok() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 128, 255, 10)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_GENERATE = {
    "corrupt image": (generate_request("x", [b"\x89PNG\r\n\x1a\nnot really a png"]), "images[0]"),
    "truncated image": (generate_request("x", [_truncated_png()]), "images[0]"),
    "unsupported format": (generate_request("x", [b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n"]), "images[0]"),
    "decompression bomb": (generate_request("x", [_bomb_png()]), "images[0]"),
    "too many images": (generate_request("x", [image_bytes("C_200x900")] * 5), "images"),
    "image too large": (generate_request("x", [b"\0" * (9 << 20)]), "images[0]"),
    "placeholder names a missing image": (
        pb.GenerateRequest(messages=[user("<|image_2|> what?", 0)], images=[image_bytes("C_200x900")]),
        "messages[0]",
    ),
    "image never referenced": (
        pb.GenerateRequest(messages=[user("what?")], images=[image_bytes("C_200x900")]),
        "images[0]",
    ),
    "empty conversation": (pb.GenerateRequest(), "messages"),
    "role order": (
        pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_ASSISTANT, text="hi"), user("x")]),
        "messages[0].role",
    ),
    "unspecified role": (pb.GenerateRequest(messages=[pb.Message(text="x")]), "messages[0].role"),
    "temperature out of range": (generate_request("x", temperature=-1.0), "sampling.temperature"),
    "top_p out of range": (generate_request("x", top_p=1.5), "sampling.top_p"),
    "num_crops out of range": (generate_request("x", [image_bytes("C_200x900")], num_crops=17), "image_options.num_crops"),
    "logprobs too many": (generate_request("x", logprobs=50), "sampling.logprobs"),
    "repetition penalty so small it overflows": (generate_request("x", repetition_penalty=1e-40), "sampling.repetition_penalty"),
    "stop token outside vocabulary": (generate_request("x", stop_token_ids=[99999]), "sampling.stop_token_ids[0]"),
    "max_new_tokens above the limit": (generate_request("x", max_new_tokens=5000), "sampling.max_new_tokens"),
    "prompt + max_new_tokens beyond context": (
        generate_request("<|image_1|>\nx", [image_bytes("A_640x480")], num_crops=16, max_new_tokens=3000),
        "sampling.max_new_tokens",
    ),
}


def _violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            fields += [v.field for v in br.field_violations]
    return fields


def _long_good_request(stub: pb_grpc.VisionChatServiceStub, results: dict[str, object]) -> threading.Thread:
    def run() -> None:
        ids, _, fin = collect(stub.Generate(generate_request("Write a haiku about the sea.", max_new_tokens=200, ignore_eos=True), timeout=120))
        results["ids"] = ids
        results["reason"] = fin.finish_reason

    t = threading.Thread(target=run)
    t.start()
    return t


def test_bad_inputs_get_invalid_argument_while_others_are_served(stub: pb_grpc.VisionChatServiceStub, server: ServerProcess) -> None:
    results: dict[str, object] = {}
    good = _long_good_request(stub, results)
    for name, (req, field) in BAD_GENERATE.items():
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Generate(req, timeout=60))
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {err.code()} {err.details()}"
        fields = _violations(err)
        assert any(f.startswith(field) for f in fields), f"{name}: violations {fields}, details {err.details()}"
        assert field.split("[")[0] in err.details(), f"{name}: message does not name the field: {err.details()}"
    good.join(120)
    assert results.get("reason") == pb.FINISH_REASON_LENGTH and len(results["ids"]) == 200  # type: ignore[arg-type]
    server.wait_idle()


def test_bad_chat_streams(stub: pb_grpc.VisionChatServiceStub) -> None:
    img = image_bytes("C_200x900")
    start = pb.ChatStart(messages=[user("x", 0)], sampling=pb.SamplingParams(max_new_tokens=2), image_count=1)
    cases = {
        "chunk for unknown image": (
            [pb.ChatRequest(start=start), pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=3, data=b"abc"))],
            "image_chunk.image_index",
        ),
        "closed without end_of_input": (list(chat_stream(start, [img], end=False)), "end_of_input"),
        "first message not start": ([pb.ChatRequest(end_of_input=pb.EndOfInput())], "start"),
        "no bytes for an image": ([pb.ChatRequest(start=start), pb.ChatRequest(end_of_input=pb.EndOfInput())], "images[0]"),
        "too many images announced": (
            [pb.ChatRequest(start=pb.ChatStart(messages=[user("x")], image_count=99))],
            "start.image_count",
        ),
    }
    for name, (msgs, field) in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Chat(iter(msgs), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert any(f.startswith(field) for f in _violations(info.value)), (name, info.value.details())


def test_cancel_mid_stream_frees_the_request(stub: pb_grpc.VisionChatServiceStub, server: ServerProcess) -> None:
    before = server.metric("visionchat_request_success_total", finished_reason="cancelled")
    call = stub.Generate(generate_request("Write a haiku about the sea.", max_new_tokens=3000, ignore_eos=True), timeout=120)
    got = 0
    for r in call:
        if r.HasField("delta"):
            got += len(r.delta.tokens)
        if got >= 5:
            break
    call.cancel()
    info = server.wait_idle()
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in info.workers)
    deadline = time.time() + 10
    while server.metric("visionchat_request_success_total", finished_reason="cancelled") <= before and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("visionchat_request_success_total", finished_reason="cancelled") == before + 1


def test_deadline_exceeded_frees_the_request(stub: pb_grpc.VisionChatServiceStub, server: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as info:
        collect(stub.Generate(generate_request("Write a haiku about the sea.", max_new_tokens=4000, ignore_eos=True), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle()


def test_grpcurl_lists_describes_and_calls_via_reflection(server: ServerProcess) -> None:
    grpcurl = str(ROOT / ".venv/bin/grpcurl")
    listed = subprocess.run([grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=30)
    assert "visionchat.v1.VisionChatService" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    described = subprocess.run(
        [grpcurl, "-plaintext", server.address, "describe", "visionchat.v1.VisionChatService"], capture_output=True, text=True, timeout=30
    )
    assert "rpc Chat ( stream .visionchat.v1.ChatRequest ) returns ( stream .visionchat.v1.ChatResponse )" in described.stdout
    info = subprocess.run(
        [grpcurl, "-plaintext", server.address, "visionchat.v1.VisionChatService/GetModelInfo"], capture_output=True, text=True, timeout=30
    )
    model_info = json.loads(info.stdout)
    # grpcurl prints proto field names (context_length); accept the JSON-mapping name too.
    assert model_info.get("context_length", model_info.get("contextLength")) == 4096
    body = json.dumps({"messages": [{"role": "ROLE_USER", "text": "Write a haiku about the sea."}], "sampling": {"maxNewTokens": 16, "ignoreEos": True}})
    gen = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, server.address, "visionchat.v1.VisionChatService/Generate"],
        capture_output=True, text=True, timeout=60,
    )
    assert gen.returncode == 0, gen.stderr
    decoder = json.JSONDecoder()
    text, pos, ids = gen.stdout, 0, []
    while pos < len(text.rstrip()):
        obj, end = decoder.raw_decode(text, pos)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        ids += [t.get("token_id", t.get("tokenId")) for t in obj.get("delta", {}).get("tokens", [])]
    assert ids == GOLDEN_TEXT


def test_repeated_prefix_reports_cached_tokens(stub: pb_grpc.VisionChatServiceStub) -> None:
    image = [image_bytes("B_1024x300")]
    first = generate_request("<|image_1|>\nWhat is shown here?", image, num_crops=4, max_new_tokens=4, ignore_eos=True)
    collect(stub.Generate(first, timeout=60))
    second = generate_request("<|image_1|>\nWhat is shown here? Answer briefly.", image, num_crops=4, max_new_tokens=4, ignore_eos=True)
    _, _, fin2 = collect(stub.Generate(second, timeout=60))
    # The image (601 tokens) and the text before the question come from the prefix cache.
    assert fin2.usage.cached_tokens >= 601 and fin2.usage.cached_tokens % 16 == 0
    assert fin2.usage.cached_tokens < fin2.usage.prompt_tokens


def test_multi_turn_conversation_with_images_in_two_turns(stub: pb_grpc.VisionChatServiceStub) -> None:
    images = [image_bytes("C_200x900"), image_bytes("B_1024x300")]
    messages = [
        pb.Message(role=pb.ROLE_SYSTEM, text="You are a terse assistant."),
        pb.Message(role=pb.ROLE_USER, text="What is in this picture?", image_indices=[0]),  # no placeholder: prepended
        pb.Message(role=pb.ROLE_ASSISTANT, text="A tall narrow scene."),
        pb.Message(role=pb.ROLE_USER, text="And here: <|image_2|> is it wider?", image_indices=[1]),
    ]
    counted = stub.CountTokens(pb.CountTokensRequest(messages=messages, images=images), timeout=30)
    assert counted.image_tokens == 781 + 601  # two images: num_crops 4 each
    start = pb.ChatStart(messages=messages, sampling=pb.SamplingParams(max_new_tokens=6, ignore_eos=True), image_count=2)
    ids, _, fin = collect(stub.Chat(chat_stream(start, images, chunk=50_000), timeout=60))
    assert len(ids) == 6 and fin.usage.prompt_tokens == counted.prompt_tokens


def test_vanishing_temperature_is_greedy_not_a_crash(stub: pb_grpc.VisionChatServiceStub, server: ServerProcess) -> None:
    restarts = server.metric("visionchat_worker_restarts_total")
    req = generate_request("Write a haiku about the sea.", max_new_tokens=16, ignore_eos=True, temperature=1e-40, seed=3)
    ids, _, fin = collect(stub.Generate(req, timeout=60))
    assert ids == GOLDEN_TEXT and fin.finish_reason == pb.FINISH_REASON_LENGTH
    assert server.metric("visionchat_worker_restarts_total") == restarts


def test_calls_cancelled_while_submitting_leave_nothing_behind(server: ServerProcess) -> None:
    """Deadlines that expire while large uploads are prepared or handed to the worker."""
    image = _large_png(5 << 20)

    def one(timeout: float) -> None:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            req = generate_request("What is this noise?", [image], num_crops=1, max_new_tokens=200, ignore_eos=True)
            try:
                collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=timeout))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    threads = [threading.Thread(target=one, args=(0.05 + 0.05 * (i % 6),)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    server.wait_idle()
    deadline = time.time() + 10
    while server.metric("visionchat_num_requests_waiting_frontend") and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric("visionchat_num_requests_waiting_frontend") == 0
