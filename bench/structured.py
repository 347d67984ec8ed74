"""Structured-output benchmark: constrained streams next to unconstrained ones, and grammar compile times.

    make bench-structured
    .venv/bin/python bench/structured.py --help

A real server (the tiny fixture model unless --model) serves, one phase after the other and twice in
alternation, 16 concurrent unconstrained streams and 16 concurrent streams constrained by a response
format (a JSON Schema whose shortest valid output is longer than the streams run, so every stream
makes all its tokens), all sampled with seeds and cut by max_new_tokens. Reported: tokens/s of each
and their ratio (target >= 0.8), and, in this process, the time to validate a format and to get a
matcher for it, cold and from the cache, over the test suite's schemas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from harness import TINY_MODEL, ServerProcess  # noqa: E402
from test_structured import SCHEMAS  # noqa: E402

from service.processor.prompt import PromptBuilder  # noqa: E402
from service.structured import Grammars, ResponseFormat, choice_format  # noqa: E402

LONG_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 0}},
        "required": ["name", "qty"],
    },
    "minItems": 40,
}


async def stream(stub: pb_grpc.VisionChatServiceStub, seed: int, tokens: int, constrained: bool) -> int:
    sampling = pb.SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True)
    if constrained:
        sampling.response_format.json_schema = json.dumps(LONG_SCHEMA)
    req = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, text=f"List the items ({seed}).")], sampling=sampling
    )
    count = 0
    async for r in stub.Generate(req, timeout=600):
        if r.HasField("delta"):
            count += len(r.delta.tokens)
    return count


async def phase(address: str, streams: int, tokens: int, constrained: bool, round_: int) -> float:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        start = time.perf_counter()
        counts = await asyncio.gather(*(stream(stub, round_ * 100 + i, tokens, constrained) for i in range(streams)))
        elapsed = time.perf_counter() - start
    assert all(c == tokens for c in counts), counts
    return sum(counts) / elapsed


def compile_times(model: str) -> list[tuple[str, float, float, float, float]]:
    builder = PromptBuilder(model)
    grammars = Grammars(builder.tokenizer, 32064, builder.eos_token_ids)
    formats = {f"json_schema: {name}": ResponseFormat("json_schema", json.dumps(s)) for name, s in SCHEMAS.items()}
    formats["regex"] = ResponseFormat("regex", r"[a-z]{3,8}-[0-9]{2}")
    formats["choice"] = choice_format(["cat", "dog", "other animal"])
    rows = []
    for name, fmt in formats.items():
        timings = []
        for call in (grammars.problem, grammars.problem, grammars.matcher, grammars.matcher):
            start = time.perf_counter()
            call(fmt)
            timings.append((time.perf_counter() - start) * 1000)
        rows.append((name, *timings))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    server = ServerProcess(["--model", args.model]).start(timeout=600)
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        asyncio.run(phase(server.address, 4, 8, True, 99))  # warm-up: first requests pay for lazy set-up
        for round_ in range(args.rounds):
            for constrained in (False, True):
                rates[constrained].append(
                    asyncio.run(phase(server.address, args.streams, args.tokens, constrained, round_))
                )
    finally:
        server.stop()
    plain, shaped = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"\n{args.streams} streams x {args.tokens} sampled tokens, model {Path(args.model).name}, "
        f"median of {args.rounds}:\n"
    )
    print("| streams | tokens/s | vs unconstrained |")
    print("|---|---|---|")
    print(f"| unconstrained | {plain:,.1f} | 1.00× |")
    print(f"| constrained (JSON Schema, array of 40+ objects) | {shaped:,.1f} | {shaped / plain:.2f}× (target ≥ 0.8) |")
    print("\n| format | validate cold (ms) | validate cached (ms) | matcher cold (ms) | matcher cached (ms) |")
    print("|---|---|---|---|---|")
    for name, *t in compile_times(args.model):
        print(f"| {name} | {t[0]:.2f} | {t[1]:.3f} | {t[2]:.2f} | {t[3]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
