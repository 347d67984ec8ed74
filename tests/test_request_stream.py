"""RequestStream: what queued up while the consumer was busy arrives as one merged output."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import EngineRequest, FinishReason, RequestOutput, SamplingOptions, TokenOutput
from service.router import RequestStream, WorkerLost

REQUEST = EngineRequest("r", (1, 2, 3), (), SamplingOptions(max_new_tokens=4), 0.0)


def _out(*ids: int, queue: float | None = None, finish: FinishReason | None = None) -> RequestOutput:
    # The engine reports the cached tokens so far (cumulative) on every output, the queue time on the first.
    return RequestOutput("r", tokens=[TokenOutput(i) for i in ids], finish_reason=finish, queue_seconds=queue, num_cached_tokens=32)


async def _drain(stream: RequestStream) -> list[RequestOutput]:
    return [out async for out in stream]


def test_queued_outputs_merge_in_order_and_keep_first_timing() -> None:
    stream = RequestStream(REQUEST, worker=None)  # type: ignore[arg-type]
    for item in (_out(1, queue=0.5), _out(2), _out(3), _out(4, finish=FinishReason.LENGTH)):
        stream.queue.put_nowait(item)
    outs = asyncio.run(_drain(stream))
    assert len(outs) == 1
    merged = outs[0]
    assert [t.token_id for t in merged.tokens] == [1, 2, 3, 4]
    assert merged.finish_reason is FinishReason.LENGTH and merged.queue_seconds == 0.5 and merged.num_cached_tokens == 32


def test_error_after_tokens_is_raised_after_they_are_delivered() -> None:
    stream = RequestStream(REQUEST, worker=None)  # type: ignore[arg-type]
    stream.queue.put_nowait(_out(1, queue=0.1))
    stream.queue.put_nowait(_out(2))
    stream.queue.put_nowait(WorkerLost("gone"))
    got: list[int] = []

    async def consume() -> None:
        async for out in stream:
            got.extend(t.token_id for t in out.tokens)

    with pytest.raises(WorkerLost):
        asyncio.run(consume())
    assert got == [1, 2]
