"""Unit tests of the pure parts of the client: request building, chunking, result folding, CLI args.

No server and no network: everything here runs on hand-built proto messages.
"""

from __future__ import annotations

import json

import pytest
from visionchat.v1 import visionchat_pb2 as pb

from client import ChatResult, Delta, ResultAccumulator, StreamProtocolError
from client.channel import MAX_MESSAGE_BYTES, channel_options
from client.cli import build_parser, parse_args, sampling_kwargs, usage_line
from client.requests import (
    DEFAULT_CHUNK_SIZE,
    build_messages,
    chat_request_stream,
    image_options,
    prepare_request,
    read_image,
    sampling_params,
)
from client.results import finish_reason_name, iter_results, token_count_from_proto

# --- request building -------------------------------------------------------------------------


def test_prompt_with_images_is_one_user_turn_with_all_indices():
    messages, images = build_messages("describe", [b"a", b"b", b"c"])
    assert [(m.role, m.text, list(m.image_indices)) for m in messages] == [(pb.ROLE_USER, "describe", [0, 1, 2])]
    assert images == [b"a", b"b", b"c"]


def test_system_message_goes_first():
    messages, _ = build_messages("hi", system="be brief")
    assert [(m.role, m.text) for m in messages] == [(pb.ROLE_SYSTEM, "be brief"), (pb.ROLE_USER, "hi")]


def test_single_image_source_is_not_iterated():
    _, images = build_messages("hi", b"abc")
    assert images == [b"abc"]
    messages, images = build_messages([{"text": "hi", "images": "cat.jpg"}])
    assert images == ["cat.jpg"] and list(messages[0].image_indices) == [0]


def test_message_dicts_inline_images_and_indices():
    messages, images = build_messages(
        [
            {"role": "system", "text": "sys"},
            {"role": "user", "text": "first", "images": [b"inline"]},
            {"role": "assistant", "text": "ok"},
            {"role": "USER", "text": "second", "images": [0]},
        ],
        [b"top"],
    )
    assert images == [b"top", b"inline"]
    assert [(m.role, list(m.image_indices)) for m in messages] == [
        (pb.ROLE_SYSTEM, []),
        (pb.ROLE_USER, [1]),
        (pb.ROLE_ASSISTANT, []),
        (pb.ROLE_USER, [0]),
    ]


def test_unattached_images_go_to_first_user_turn_and_tags_attach():
    messages, _ = build_messages(
        [{"text": "look"}, {"role": "assistant", "text": "yes"}, {"text": "and <|image_3|>?"}],
        [b"a", b"b", b"c"],
    )
    assert [list(m.image_indices) for m in messages] == [[0, 1], [], [2]]


def test_proto_messages_pass_through_unchecked():
    raw = pb.Message(role=pb.ROLE_USER, text="x", image_indices=[7])
    messages, _ = build_messages([raw])
    assert list(messages[0].image_indices) == [7]
    assert messages[0] is not raw  # copied, the caller's object stays untouched


@pytest.mark.parametrize(
    "conversation, error",
    [
        ([{"role": "robot", "text": "x"}], ValueError),
        ([{"role": "user", "content": "x"}], ValueError),
        ([{"role": "user", "images": [3]}], ValueError),
        ([{"role": "user", "images": [1.5]}], TypeError),
        ({"role": "user", "text": "x"}, TypeError),
        (["just a string"], TypeError),
    ],
)
def test_bad_message_dicts_are_rejected(conversation, error):
    with pytest.raises(error):
        build_messages(conversation)


def test_images_without_user_turn_are_rejected():
    with pytest.raises(ValueError):
        build_messages([{"role": "system", "text": "s"}], [b"img"])


def test_read_image_from_path_and_bytes(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8data")
    assert read_image(path) == b"\xff\xd8data"
    assert read_image(str(path)) == b"\xff\xd8data"
    assert read_image(bytearray(b"ab")) == b"ab"
    with pytest.raises(TypeError):
        read_image(42)  # type: ignore[arg-type]


def test_sampling_params_sets_only_given_fields():
    params = sampling_params(
        max_new_tokens=16, temperature=0.5, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=0,
        stop="###", stop_token_ids=[32007], ignore_eos=True, logprobs=3,
    )
    assert params.max_new_tokens == 16 and params.top_k == 40 and params.logprobs == 3
    assert params.temperature == pytest.approx(0.5) and params.top_p == pytest.approx(0.9)
    assert params.repetition_penalty == pytest.approx(1.1)
    assert params.HasField("seed") and params.seed == 0  # seed 0 is a real seed, not "unset"
    assert list(params.stop) == ["###"] and list(params.stop_token_ids) == [32007] and params.ignore_eos
    empty = sampling_params()
    assert empty == pb.SamplingParams() and not empty.HasField("seed")
    assert list(sampling_params(stop=["a", "b"]).stop) == ["a", "b"]


def test_sampling_params_rejects_unknown_keywords():
    with pytest.raises(TypeError):
        sampling_params(max_tokens=5)  # type: ignore[call-arg]


def test_image_options():
    assert not image_options().HasField("num_crops")
    assert image_options(4).num_crops == 4


def _reassemble(requests: list[pb.ChatRequest]) -> dict[int, bytes]:
    images: dict[int, bytes] = {}
    for r in requests:
        if r.HasField("image_chunk"):
            images[r.image_chunk.image_index] = images.get(r.image_chunk.image_index, b"") + r.image_chunk.data
    return images


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000, 1001, DEFAULT_CHUNK_SIZE])
def test_chat_request_stream_chunks_in_order(chunk_size):
    images = [bytes(range(256)) * 4, b"", b"xyz" * 333]  # 1024, 0 and 999 bytes
    start = pb.ChatStart(image_count=len(images))
    requests = list(chat_request_stream(start, images, chunk_size))
    kinds = [r.WhichOneof("kind") for r in requests]
    assert kinds[0] == "start" and requests[0].start == start
    assert kinds[-1] == "end_of_input" and set(kinds[1:-1]) == {"image_chunk"}
    chunks = [r.image_chunk for r in requests[1:-1]]
    assert all(len(c.data) <= chunk_size for c in chunks)
    # Images are sent one after another, each as ceil(len/chunk) chunks (an empty one as one chunk).
    expected_counts = [max(1, -(-len(img) // chunk_size)) for img in images]
    assert [c.image_index for c in chunks] == [i for i, n in enumerate(expected_counts) for _ in range(n)]
    assert _reassemble(requests) == dict(enumerate(images))


def test_chat_request_stream_without_images():
    kinds = [r.WhichOneof("kind") for r in chat_request_stream(pb.ChatStart(), [])]
    assert kinds == ["start", "end_of_input"]


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_chat_request_stream_rejects_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError):
        list(chat_request_stream(pb.ChatStart(), [b"x"], chunk_size))


def test_prepared_request_feeds_every_rpc(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"PNGDATA")
    prepared = prepare_request(
        "what?", [path, b"raw"], system="s", num_crops=2, request_id="r1", max_new_tokens=8, logprobs=2
    )
    assert prepared.images == [b"PNGDATA", b"raw"] and prepared.wants_logprobs
    start = prepared.chat_start()
    assert start.image_count == 2 and start.request_id == "r1" and start.image_options.num_crops == 2
    assert start.sampling.max_new_tokens == 8 and len(start.messages) == 2
    requests = list(prepared.chat_requests(chunk_size=3))
    assert _reassemble(requests) == {0: b"PNGDATA", 1: b"raw"}
    gen = prepared.generate_request()
    assert list(gen.images) == [b"PNGDATA", b"raw"] and gen.sampling == start.sampling
    assert gen.messages == start.messages and gen.request_id == "r1"
    count = prepared.count_tokens_request()
    assert list(count.images) == [b"PNGDATA", b"raw"] and count.image_options.num_crops == 2
    assert not prepare_request("x").wants_logprobs


def test_channel_options_defaults_and_overrides():
    opts = dict(channel_options())
    assert opts["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
    assert opts["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert json.loads(opts["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    merged = dict(channel_options([("grpc.max_receive_message_length", 5), ("grpc.primary_user_agent", "t")]))
    assert merged["grpc.max_receive_message_length"] == 5 and merged["grpc.primary_user_agent"] == "t"
    assert dict(channel_options({"grpc.max_send_message_length": 7}))["grpc.max_send_message_length"] == 7


# --- result folding ---------------------------------------------------------------------------


def _delta(text: str, *token_ids: int, logprob: float = 0.0, top: int = 0) -> pb.ChatResponse:
    tokens = [
        pb.TokenInfo(
            token_id=t,
            logprob=logprob,
            top_logprobs=[pb.TokenLogprob(token_id=t + k, logprob=logprob - k) for k in range(top)],
        )
        for t in token_ids
    ]
    return pb.ChatResponse(delta=pb.ChatDelta(text=text, tokens=tokens))


def _finished(reason: int = pb.FINISH_REASON_EOS, **kwargs) -> pb.ChatResponse:
    return pb.ChatResponse(
        finished=pb.ChatFinished(
            finish_reason=reason,
            usage=pb.Usage(prompt_tokens=775, image_tokens=757, completion_tokens=3, cached_tokens=12),
            timings=pb.Timings(queue_seconds=0.01, time_to_first_token_seconds=0.123, total_seconds=0.456),
            request_id="req-1",
            **kwargs,
        )
    )


def test_accumulator_folds_deltas_into_result():
    acc = ResultAccumulator()
    first = acc.add(_delta("Hel", 1, 2))
    assert first == Delta(text="Hel", token_ids=[1, 2], logprobs=None)
    assert acc.add(_delta("", 3)) == Delta(text="", token_ids=[3])  # text lagging its token
    assert acc.add(_delta("lo", )) == Delta(text="lo", token_ids=[])
    assert not acc.done
    result = acc.add(_finished())
    assert acc.done and acc.result() is result
    assert result == ChatResult(
        text="Hello", token_ids=[1, 2, 3], finish_reason="eos",
        usage=result.usage, timings=result.timings, request_id="req-1",
    )
    assert (result.usage.prompt_tokens, result.usage.image_tokens) == (775, 757)
    assert (result.usage.completion_tokens, result.usage.cached_tokens) == (3, 12)
    assert result.timings.time_to_first_token_seconds == pytest.approx(0.123)
    assert result.timings.queue_seconds == pytest.approx(0.01)
    assert result.logprobs is None and result.matched_stop == "" and result.error_message == ""


@pytest.mark.parametrize(
    "value, name",
    [
        (pb.FINISH_REASON_EOS, "eos"),
        (pb.FINISH_REASON_LENGTH, "length"),
        (pb.FINISH_REASON_STOP_STRING, "stop_string"),
        (pb.FINISH_REASON_STOP_TOKEN, "stop_token"),
        (pb.FINISH_REASON_CANCELLED, "cancelled"),
        (pb.FINISH_REASON_ERROR, "error"),
        (pb.FINISH_REASON_UNSPECIFIED, "unspecified"),
        (42, "unknown_42"),
    ],
)
def test_finish_reason_names(value, name):
    assert finish_reason_name(value) == name
    if value != 42:  # proto3 enums are open, but keep the hand-built message valid for known ones
        acc = ResultAccumulator()
        assert acc.add(_finished(value)).finish_reason == name


def test_matched_stop_and_error_message_are_kept():
    stop = ResultAccumulator().add(_finished(pb.FINISH_REASON_STOP_STRING, matched_stop="###"))
    assert stop.finish_reason == "stop_string" and stop.matched_stop == "###"
    err = ResultAccumulator().add(_finished(pb.FINISH_REASON_ERROR, error_message="worker died"))
    assert err.finish_reason == "error" and err.error_message == "worker died"


def test_accumulator_logprobs():
    acc = ResultAccumulator(with_logprobs=True)
    d1 = acc.add(_delta("a", 10, logprob=-0.25, top=2))
    d2 = acc.add(_delta("b", 11, 12, logprob=0.0, top=1))
    assert [lp.token_id for lp in d1.logprobs] == [10]
    assert d1.logprobs[0].logprob == pytest.approx(-0.25)
    assert [(t.token_id, t.logprob) for t in d1.logprobs[0].top_logprobs] == [(10, -0.25), (11, -1.25)]
    assert [lp.token_id for lp in d2.logprobs] == [11, 12] and d2.logprobs[1].logprob == 0.0
    result = acc.add(_finished())
    assert [lp.token_id for lp in result.logprobs] == [10, 11, 12]
    assert result.to_dict()["logprobs"][0] == {
        "token_id": 10, "logprob": -0.25,
        "top_logprobs": [{"token_id": 10, "logprob": -0.25}, {"token_id": 11, "logprob": -1.25}],
    }


def test_accumulator_protocol_errors():
    acc = ResultAccumulator()
    acc.add(_delta("x", 1))
    with pytest.raises(StreamProtocolError):
        acc.result()
    assert acc.add(pb.ChatResponse()) is None  # empty oneof: nothing to report, not an error
    acc.add(_finished())
    with pytest.raises(StreamProtocolError):
        acc.add(_delta("late", 2))


def test_iter_results_yields_deltas_then_result_and_detects_truncation():
    items = list(iter_results([_delta("a", 1), pb.ChatResponse(), _delta("b", 2), _finished()]))
    assert [type(i) for i in items] == [Delta, Delta, ChatResult] and items[-1].text == "ab"
    with pytest.raises(StreamProtocolError):
        list(iter_results([_delta("a", 1)]))


def test_result_to_dict_is_json_ready():
    result = ResultAccumulator().add(_finished(pb.FINISH_REASON_LENGTH))
    data = json.loads(json.dumps(result.to_dict()))
    assert {"text", "token_ids", "finish_reason", "usage", "timings", "request_id"} <= set(data)
    assert "logprobs" not in data  # not requested
    assert data["usage"] == {
        "prompt_tokens": 775, "image_tokens": 757, "completion_tokens": 3, "cached_tokens": 12, "video_tokens": 0
    }
    assert data["videos"] == []
    assert data["finish_reason"] == "length"


def test_token_count_from_proto():
    count = token_count_from_proto(
        pb.CountTokensResponse(
            prompt_tokens=800, text_tokens=43, image_tokens=757,
            images=[pb.ImageTokenCount(image_index=0, width=640, height=480, num_crops=16, tokens=757)],
        )
    )
    assert count.to_dict() == {
        "prompt_tokens": 800, "text_tokens": 43, "image_tokens": 757,
        "images": [{"image_index": 0, "width": 640, "height": 480, "num_crops": 16, "tokens": 757, "processed_width": 0, "processed_height": 0, "crops": 0}],
        "video_tokens": 0,
        "videos": [],
    }


# --- CLI argument parsing ---------------------------------------------------------------------


def test_cli_chat_arguments():
    args = parse_args(
        [
            "chat", "--server", "h:1", "--image", "a.jpg", "--image", "b.png", "--system", "S",
            "--max-new-tokens", "16", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5",
            "--seed", "3", "--stop", "###", "--stop", "END", "--ignore-eos", "--num-crops", "4",
            "--logprobs", "2", "--json", "--generate", "--timeout", "2.5", "PROMPT TEXT",
        ]
    )
    assert args.command == "chat" and args.server == "h:1" and args.prompt == "PROMPT TEXT"
    assert args.image == ["a.jpg", "b.png"] and args.system == "S" and args.num_crops == 4
    assert args.json and args.generate and args.timeout == 2.5
    assert sampling_kwargs(args) == {
        "max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3,
        "stop": ["###", "END"], "ignore_eos": True, "logprobs": 2,
    }


def test_cli_chat_defaults_leave_sampling_to_server(monkeypatch):
    monkeypatch.delenv("VISIONCHAT_SERVER", raising=False)
    args = parse_args(["chat", "hi"])
    assert args.server == "127.0.0.1:50051" and args.image is None and not args.json and not args.generate
    assert args.chunk_size == DEFAULT_CHUNK_SIZE and args.timeout is None
    assert sampling_kwargs(args) == {}


def test_cli_server_from_environment(monkeypatch):
    monkeypatch.setenv("VISIONCHAT_SERVER", "dns:///visionchat:50051")
    assert parse_args(["info"]).server == "dns:///visionchat:50051"
    assert parse_args(["count-tokens", "--image", "x.jpg", "p"]).server == "dns:///visionchat:50051"


def test_cli_count_tokens_and_info_arguments():
    args = parse_args(["count-tokens", "--server", "s:2", "--image", "x.jpg", "--num-crops", "1", "hello"])
    assert (args.command, args.server, args.image, args.num_crops, args.prompt) == (
        "count-tokens", "s:2", ["x.jpg"], 1, "hello",
    )
    assert parse_args(["info", "--server", "s:3"]).command == "info"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["chat"],  # prompt missing
        ["chat", "--max-new-tokens", "-1", "x"],
        ["chat", "--num-crops", "0", "x"],
        ["chat", "--temperature", "nan", "x"],
        ["chat", "--chunk-size", "0", "x"],
        ["info", "extra"],
        ["bogus"],
    ],
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_usage_line_format():
    result = ResultAccumulator().add(_finished(pb.FINISH_REASON_LENGTH))
    assert usage_line(result) == "[finish=length prompt=775 image=757 completion=3 ttft=0.123s total=0.456s]"


def test_videos_attach_to_the_turn_that_names_them_and_stream_as_chunks():
    from client import Video

    prepared = prepare_request("Summarize.", videos=[Video(b"abcdef", num_frames=3, end_seconds=2.5), b"xyz"])
    assert list(prepared.messages[0].video_indices) == [0, 1]
    assert prepared.videos[0].options.num_frames == 3 and prepared.videos[0].options.end_seconds == 2.5
    assert not prepared.videos[1].options.HasField("end_seconds")  # unset: the server's default
    chunks = [r.video_chunk for r in prepared.chat_requests(chunk_size=4) if r.HasField("video_chunk")]
    assert [(c.video_index, c.data) for c in chunks] == [(0, b"abcd"), (0, b"ef"), (1, b"xyz")]
    assert len(prepared.chat_start().videos) == 2 and prepared.generate_request().videos[1].data == b"xyz"
    turns = [{"role": "user", "text": "First."}, {"role": "assistant", "text": "Ok."}, {"role": "user", "text": "Now <|video_1|>?"}]
    named = prepare_request(turns, videos=[b"clip"])
    assert [list(m.video_indices) for m in named.messages] == [[], [], [0]]
