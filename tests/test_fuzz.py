"""Fuzzing the request messages against a live server: random but well-typed GenerateRequest,
CountTokensRequest and Chat streams (hypothesis), and random bytes on the wire. Whatever arrives, the
answer is a deliberate status (never UNKNOWN or INTERNAL), the server keeps serving, and every KV
block comes back.

    make fuzz                       # FUZZ_EXAMPLES=10000 (the suite runs fewer)
"""

from __future__ import annotations

import collections
import io
import os
from collections.abc import Iterator

import grpc
import pytest
from harness import TINY_MODEL, ServerProcess, collect, generate_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
SPECIALS = ["<|end|>", "<|assistant|>", "<|user|>", "<|system|>", "<|endoftext|>", "<s>", "</s>", "<|image_1|>",
            "<|image_2|>", "<|video_1|>", "<|image_0|>", "<|image_99|>", "\x00", "\ud7ff", "\n"]


def tiny_png(color: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8 + color % 5, 6), (color % 256, 0, 0)).save(out, format="PNG")
    return out.getvalue()


texts = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS)), max_size=6).map("".join)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e-6, -1.0, 2.0]))
small_ints = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
images = st.one_of(st.binary(max_size=64), st.integers(0, 255).map(tiny_png), st.just(b""))


@st.composite
def messages(draw: st.DrawFn) -> list[pb.Message]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        out.append(
            pb.Message(
                role=draw(st.integers(0, 4)),
                text=draw(texts),
                image_indices=draw(st.lists(small_ints, max_size=3)),
                video_indices=draw(st.lists(st.integers(0, 2), max_size=1)),
            )
        )
    return out


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    params = pb.SamplingParams(
        max_new_tokens=draw(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1))),
        temperature=draw(floats),
        top_p=draw(floats),
        top_k=draw(st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1))),
        repetition_penalty=draw(floats),
        seed=draw(st.integers(0, 2**64 - 1)),
        stop=draw(st.lists(texts, max_size=3)),
        stop_token_ids=draw(st.lists(small_ints, max_size=3)),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))),
    )
    kind = draw(st.sampled_from([None, "json_schema", "regex", "choice", "json_object", "lark_grammar"]))
    if kind == "choice":
        params.response_format.choice.options.extend(draw(st.lists(texts, max_size=3)))
    elif kind == "json_object":
        params.response_format.json_object.SetInParent()
    elif kind is not None:
        setattr(params.response_format, kind, draw(st.one_of(texts, st.sampled_from(['{"type": "object"}', "[a-z]+", "start: /x+/"]))))
    return params


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=draw(messages()),
        sampling=draw(sampling()),
        images=draw(st.lists(images, max_size=3)),
        image_options=pb.ImageOptions(num_crops=draw(st.integers(0, 20))),
        request_id=draw(st.text(max_size=300)),
        videos=[pb.Video(data=draw(st.binary(max_size=64)), options=pb.VideoOptions(num_frames=draw(st.integers(0, 100))))]
        if draw(st.booleans())
        else [],
    )


@st.composite
def plausible_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Mostly valid requests with a random twist, so the fuzz also reaches generation."""
    images = draw(st.lists(st.integers(0, 255).map(tiny_png), max_size=2))
    params = pb.SamplingParams(
        max_new_tokens=draw(st.integers(0, 6)),
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
        top_k=draw(st.integers(0, 20)),
        seed=draw(st.integers(0, 1000)),
        stop=draw(st.lists(texts, max_size=2)),
        logprobs=draw(st.integers(0, 3)),
    )
    if draw(st.booleans()):
        params.response_format.CopyFrom(draw(st.sampled_from([
            pb.ResponseFormat(regex="[a-z]{1,5}"),
            pb.ResponseFormat(choice=pb.Choice(options=["yes", "no"])),
            pb.ResponseFormat(json_schema='{"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}'),
        ])))
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, text=draw(texts), image_indices=range(len(images)))],
        images=images,
        image_options=pb.ImageOptions(num_crops=draw(st.integers(0, 4))),
        sampling=params,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        ["--model", str(TINY_MODEL), "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-new-tokens", "8",
         "--default-max-new-tokens", "8"]
    ).start()
    yield proc
    proc.stop()


def test_random_requests_get_deliberate_statuses_and_leak_nothing(server: ServerProcess) -> None:
    seen: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        generate = ch.unary_stream("/visionchat.v1.VisionChatService/Generate")
        count = ch.unary_unary("/visionchat.v1.VisionChatService/CountTokens")

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            request=st.one_of(plausible_requests(), generate_requests()),
            how=st.sampled_from(["generate", "count", "chat", "raw"]),
            raw=st.binary(max_size=200),
        )
        def one(request: pb.GenerateRequest, how: str, raw: bytes) -> None:
            try:
                if how == "generate":
                    collect(stub.Generate(request, timeout=30))
                elif how == "count":
                    stub.CountTokens(
                        pb.CountTokensRequest(messages=request.messages, images=request.images, videos=request.videos),
                        timeout=30,
                    )
                elif how == "chat":
                    start = pb.ChatStart(messages=request.messages, sampling=request.sampling, image_count=len(request.images) % 3)
                    chunks = [pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=k, data=d)) for k, d in enumerate(request.images)]
                    collect(stub.Chat(iter([pb.ChatRequest(start=start), *chunks, pb.ChatRequest(end_of_input=pb.EndOfInput())]), timeout=30))
                else:  # bytes that may not even be protobuf
                    count(raw, timeout=30)
                    list(generate(raw, timeout=30))
                seen["OK"] += 1
            except grpc.RpcError as err:
                seen[err.code().name] += 1
                assert err.code() in ALLOWED, (how, err.code(), err.details(), request)

        one()
    server.wait_idle()
    ids, _, _ = collect(stub_generate(server))
    assert len(ids) == 3
    print(f"\nfuzz: {sum(seen.values())} requests: {dict(seen)}")  # the closing note's figures


def stub_generate(server: ServerProcess) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(server.address) as ch:
        return list(pb_grpc.VisionChatServiceStub(ch).Generate(generate_request("Still there?", max_new_tokens=3, ignore_eos=True), timeout=60))
