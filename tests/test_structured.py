"""Structured outputs on the random-weight tiny model: whatever the weights, every sampled output lies in
the response format's language (JSON Schema, regex, choice, Lark), under batching and preemption, and
unconstrained neighbours are untouched. Real servers, real workers, real gRPC clients."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
from harness import TINY_MODEL, ServerProcess, collect, generate_request, node_chat_client
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

# Finite languages: with random weights an unbounded string or number could run to max_new_tokens.
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["person", "address"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5}, "maxItems": 3},
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "animal": {"enum": ["cat", "dog", "other"]},
            "color": {"type": "string", "enum": ["red", "green", "light blue"]},
            "legs": {"enum": [0, 2, 4]},
        },
        "required": ["animal", "color", "legs"],
        "additionalProperties": False,
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": -5, "maximum": 250},
            "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
            "ok": {"type": "boolean"},
        },
        "required": ["count", "year", "ok"],
        "additionalProperties": False,
    },
    "patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{2,3}-[0-9]{1,4}$"},
        },
        "required": ["date", "code"],
        "additionalProperties": False,
    },
}
REGEX = r"[a-z]{3,8}-[0-9]{2}"
CHOICES = ["cat", "dog", "other animal"]
RUNS = 100


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(["--model", str(TINY_MODEL), "--dtype", "float32", "--kv-cache-memory", "32MiB"]).start()
    yield proc
    proc.stop()


def constrained(fmt: pb.ResponseFormat, seed: int, max_new_tokens: int = 200, **sampling: object) -> pb.GenerateRequest:
    req = generate_request("Fill in the record for the photo.", max_new_tokens=max_new_tokens, **sampling)
    req.sampling.response_format.CopyFrom(fmt)
    if seed >= 0:
        req.sampling.temperature, req.sampling.seed = 1.0, seed
    return req


def run_all(address: str, requests: list[pb.GenerateRequest]) -> list[tuple[list[int], str, pb.ChatFinished]]:
    def one(req: pb.GenerateRequest) -> tuple[list[int], str, pb.ChatFinished]:
        with grpc.insecure_channel(address) as ch:
            return collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=300))

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(one, requests))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_always_validate_against_their_schema(server: ServerProcess, name: str) -> None:
    schema = SCHEMAS[name]
    fmt = pb.ResponseFormat(json_schema=json.dumps(schema))
    results = run_all(server.address, [constrained(fmt, seed) for seed in range(RUNS)])
    texts = set()
    for _, text, fin in results:
        jsonschema.validate(json.loads(text), schema)
        assert fin.finish_reason == pb.FINISH_REASON_GRAMMAR_COMPLETE, (text, fin)
        texts.add(text)
    assert len(texts) >= 3  # really sampled: the seeds give different records


def test_regex_choice_lark_and_any_json_object(server: ServerProcess) -> None:
    formats = {
        "regex": pb.ResponseFormat(regex=REGEX),
        "choice": pb.ResponseFormat(choice=pb.Choice(options=CHOICES)),
        "lark": pb.ResponseFormat(lark_grammar='start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'),
        "json_object": pb.ResponseFormat(json_object=pb.JsonObject()),
    }
    requests = [constrained(fmt, seed, max_new_tokens=300) for fmt in formats.values() for seed in range(RUNS)]
    results = run_all(server.address, requests)
    by_kind = {kind: results[i * RUNS : (i + 1) * RUNS] for i, kind in enumerate(formats)}
    for _, text, fin in by_kind["regex"]:
        assert re.fullmatch(REGEX, text), text
    for _, text, _ in by_kind["choice"]:
        assert text in CHOICES, text
    for _, text, _ in by_kind["lark"]:
        assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text), text
    complete = [text for _, text, fin in by_kind["json_object"] if fin.finish_reason != pb.FINISH_REASON_LENGTH]
    assert complete  # an open-ended object can run to max_new_tokens; the finished ones are objects
    for text in complete:
        assert isinstance(json.loads(text), dict)


def test_greedy_logprobs_are_of_the_masked_distribution(server: ServerProcess) -> None:
    fmt = pb.ResponseFormat(choice=pb.Choice(options=CHOICES))
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        req = constrained(fmt, -1, logprobs=20)
        logprobs = [t for r in stub.Generate(req, timeout=60) if r.HasField("delta") for t in r.delta.tokens]
    assert logprobs
    for token in logprobs:
        assert math.isfinite(token.logprob)
        assert all(math.isfinite(t.logprob) for t in token.top_logprobs)  # forbidden tokens are not listed
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) == pytest.approx(1.0, abs=1e-3)


def test_cut_short_by_max_new_tokens_finishes_with_length(server: ServerProcess) -> None:
    fmt = pb.ResponseFormat(json_schema=json.dumps(SCHEMAS["nested objects"]))
    with grpc.insecure_channel(server.address) as ch:
        ids, text, fin = collect(pb_grpc.VisionChatServiceStub(ch).Generate(constrained(fmt, 1, max_new_tokens=3), timeout=60))
    assert len(ids) == 3 and fin.finish_reason == pb.FINISH_REASON_LENGTH
    assert text.startswith("{")


@pytest.mark.parametrize(
    ("fmt", "field", "message"),
    [
        (pb.ResponseFormat(json_schema='{"type": "frobnicate"}'), "json_schema", "frobnicate"),
        (pb.ResponseFormat(json_schema="not json at all"), "json_schema", ""),
        (pb.ResponseFormat(json_schema='{"type": "string", "pattern": "(("}'), "json_schema", "unclosed group"),
        (pb.ResponseFormat(regex="(("), "regex", "unclosed group"),
        (pb.ResponseFormat(lark_grammar="start: missing_rule"), "lark_grammar", "unknown name"),
        (pb.ResponseFormat(choice=pb.Choice()), "choice", "at least one"),
    ],
)
def test_invalid_formats_are_refused_naming_the_problem(server: ServerProcess, fmt: pb.ResponseFormat, field: str, message: str) -> None:
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            collect(pb_grpc.VisionChatServiceStub(ch).Generate(constrained(fmt, 0), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sampling.response_format.{field}" in info.value.details() and message in info.value.details(), info.value.details()


WORDS = "the sea is calm tonight the tide is full the moon lies fair upon the straits".split()


def test_mixed_batch_under_preemption_keeps_constraints_and_unconstrained_tokens() -> None:
    # A KV pool of ~48 blocks for 32 concurrent requests of ~200 tokens each: sequences are preempted and
    # recomputed while their matchers advance.
    proc = ServerProcess(
        ["--model", str(TINY_MODEL), "--dtype", "float32", "--kv-cache-memory", "2304KiB",
         "--max-num-batched-tokens", "128", "--max-num-seqs", "32"]
    ).start()
    try:
        schema = SCHEMAS["nested objects"]
        fmt = pb.ResponseFormat(json_schema=json.dumps(schema))
        plain = [
            generate_request(" ".join(WORDS[i:] + WORDS[:i]) * 6, max_new_tokens=24, ignore_eos=True) for i in range(16)
        ]
        alone = [ids for ids, _, _ in (run_all(proc.address, [r]) [0] for r in plain)]
        shaped = []
        for seed in range(16):
            req = constrained(fmt, seed)
            req.messages[0].text = " ".join(WORDS[seed:] + WORDS[:seed]) * 6
            shaped.append(req)
        mixed = [r for pair in zip(plain, shaped, strict=True) for r in pair]
        results = run_all(proc.address, mixed)
        assert proc.metric("visionchat_num_preemptions_total") > 0
        for i, (ids, text, _) in enumerate(results):
            if i % 2 == 0:
                assert ids == alone[i // 2]
            else:
                jsonschema.validate(json.loads(text), schema)
        proc.wait_idle()
    finally:
        proc.stop()


def test_python_client_cli_and_node_client_send_formats(server: ServerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    from client import VisionChatClient

    schema = SCHEMAS["enums"]
    with VisionChatClient(server.address) as client:
        result = client.chat("Which animal?", response_format={"json_schema": schema}, temperature=1.0, seed=3)
        picked = client.generate("Which animal?", response_format={"choice": CHOICES}, max_new_tokens=20)
    jsonschema.validate(json.loads(result.text), schema)
    assert result.finish_reason == "grammar_complete" and picked.text in CHOICES

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    for flags, check in (
        (["--json-schema", str(schema_file)], lambda text: jsonschema.validate(json.loads(text), schema)),
        (["--choice", ",".join(CHOICES)], lambda text: text in CHOICES or pytest.fail(text)),
        (["--regex", REGEX], lambda text: re.fullmatch(REGEX, text) or pytest.fail(text)),
    ):
        cli = subprocess.run(
            [sys.executable, "-m", "client", "chat", "--server", server.address, *flags, "--temperature", "1",
             "--seed", "5", "--max-new-tokens", "100", "--json", "Answer."],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert cli.returncode == 0, cli.stderr
        check(json.loads(cli.stdout)["text"])

    node_chat = node_chat_client()
    for flags in (["--json-schema", str(schema_file)], ["--choice", ",".join(CHOICES)]):
        proc = subprocess.run(
            [*node_chat, "--server", server.address, *flags, "--temperature", "1", "--seed", "7",
             "--max-new-tokens", "100", "--json", "Answer."],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["finish_reason"] == "grammar_complete"
        if flags[0] == "--choice":
            assert out["text"] in CHOICES
        else:
            jsonschema.validate(json.loads(out["text"]), schema)
