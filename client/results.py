"""Folding server responses into the plain types of client.types.

Both clients (sync and asyncio) feed their response streams through ResultAccumulator, so the two
can never disagree on how a stream becomes deltas and a final ChatResult.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage
from visionchat.v1 import visionchat_pb2 as pb

from .types import (
    ChatResult,
    Delta,
    ImageTokenCount,
    Timings,
    TokenCount,
    TokenLogprob,
    TopLogprob,
    Usage,
    VideoFrameInfo,
    VideoInfo,
)

_FINISH_PREFIX = "FINISH_REASON_"


class StreamProtocolError(RuntimeError):
    """The server's response stream broke the contract (e.g. ended without `finished`)."""


def finish_reason_name(value: int) -> str:
    """FINISH_REASON_STOP_STRING -> "stop_string"; unknown numbers from a newer server stay visible."""
    try:
        name = pb.FinishReason.Name(value)
    except ValueError:
        return f"unknown_{value}"
    return name.removeprefix(_FINISH_PREFIX).lower()


def _token_logprob(info: pb.TokenInfo) -> TokenLogprob:
    return TokenLogprob(
        token_id=info.token_id,
        logprob=info.logprob,
        top_logprobs=[TopLogprob(t.token_id, t.logprob) for t in info.top_logprobs],
    )


class ResultAccumulator:
    """Turns ChatResponse (or GenerateResponse) messages, one at a time, into Delta objects and one final ChatResult.

    `with_logprobs` must say whether logprobs were requested: proto3 floats carry no presence, so
    a logprob of 0.0 cannot tell "not requested" from "probability one".
    """

    def __init__(self, *, with_logprobs: bool = False) -> None:
        self._with_logprobs = with_logprobs
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._result: ChatResult | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def add(self, response: pb.ChatResponse | pb.GenerateResponse) -> Delta | ChatResult | None:
        """Fold one response; returns what to hand to the caller, or None for nothing new."""
        if self._result is not None:
            raise StreamProtocolError("response received after the final `finished` message")
        kind = response.WhichOneof("kind")
        if kind == "delta":
            return self._add_delta(response.delta)
        if kind == "finished":
            self._result = self._finish(response.finished)
            return self._result
        # An empty oneof (or a kind added to the proto later) carries nothing this client knows.
        return None

    def result(self) -> ChatResult:
        """The final result; raises if the stream ended before the server sent `finished`."""
        if self._result is None:
            raise StreamProtocolError("response stream ended without a `finished` message")
        return self._result

    def _add_delta(self, delta: pb.ChatDelta) -> Delta:
        token_ids = [t.token_id for t in delta.tokens]
        logprobs = [_token_logprob(t) for t in delta.tokens] if self._with_logprobs else None
        self._text.append(delta.text)
        self._token_ids.extend(token_ids)
        if logprobs is not None:
            self._logprobs.extend(logprobs)
        return Delta(text=delta.text, token_ids=token_ids, logprobs=logprobs)

    def _finish(self, fin: pb.ChatFinished) -> ChatResult:
        return ChatResult(
            text="".join(self._text),
            token_ids=list(self._token_ids),
            finish_reason=finish_reason_name(fin.finish_reason),
            usage=Usage(
                prompt_tokens=fin.usage.prompt_tokens,
                image_tokens=fin.usage.image_tokens,
                completion_tokens=fin.usage.completion_tokens,
                cached_tokens=fin.usage.cached_tokens,
                video_tokens=fin.usage.video_tokens,
            ),
            timings=Timings(
                queue_seconds=fin.timings.queue_seconds,
                time_to_first_token_seconds=fin.timings.time_to_first_token_seconds,
                total_seconds=fin.timings.total_seconds,
            ),
            request_id=fin.request_id,
            logprobs=list(self._logprobs) if self._with_logprobs else None,
            matched_stop=fin.matched_stop,
            error_message=fin.error_message,
            videos=videos_from_proto(fin.videos),
        )


def videos_from_proto(videos: Iterable[pb.VideoInfo]) -> list[VideoInfo]:
    return [
        VideoInfo(
            video_index=v.video_index,
            width=v.width,
            height=v.height,
            duration_seconds=v.duration_seconds,
            num_crops=v.num_crops,
            tokens=v.tokens,
            codec=v.codec,
            frames_decoded=v.frames_decoded,
            frames=[VideoFrameInfo(f.frame_index, f.timestamp_seconds, f.tokens) for f in v.frames],
        )
        for v in videos
    ]


def token_count_from_proto(resp: pb.CountTokensResponse) -> TokenCount:
    return TokenCount(
        prompt_tokens=resp.prompt_tokens,
        text_tokens=resp.text_tokens,
        image_tokens=resp.image_tokens,
        images=[
            ImageTokenCount(
                image_index=i.image_index,
                width=i.width,
                height=i.height,
                num_crops=i.num_crops,
                tokens=i.tokens,
                processed_width=i.processed_width,
                processed_height=i.processed_height,
                crops=i.crops,
            )
            for i in resp.images
        ],
        video_tokens=resp.video_tokens,
        videos=videos_from_proto(resp.videos),
    )


# protobuf >= 6 can keep 64-bit integers as JSON numbers; older versions always quote them.
_UNQUOTE_INT64 = "unquote_int64_if_possible" in inspect.signature(json_format.MessageToDict).parameters


def message_to_dict(message: ProtoMessage) -> dict[str, Any]:
    """Proto field names, zero values included, 64-bit integers as ints where protobuf allows."""
    kwargs: dict[str, Any] = {
        "preserving_proto_field_name": True,
        "always_print_fields_with_no_presence": True,
    }
    if _UNQUOTE_INT64:
        kwargs["unquote_int64_if_possible"] = True
    return json_format.MessageToDict(message, **kwargs)


def iter_results(
    responses: Iterable[pb.ChatResponse | pb.GenerateResponse], *, with_logprobs: bool = False
) -> Iterator[Delta | ChatResult]:
    """Deltas as they arrive, then the ChatResult; raises StreamProtocolError on a truncated stream."""
    acc = ResultAccumulator(with_logprobs=with_logprobs)
    for response in responses:
        item = acc.add(response)
        if item is not None:
            yield item
    acc.result()


async def aiter_results(
    responses: AsyncIterable[pb.ChatResponse | pb.GenerateResponse], *, with_logprobs: bool = False
) -> AsyncIterator[Delta | ChatResult]:
    """The asyncio twin of iter_results; the folding itself lives in ResultAccumulator."""
    acc = ResultAccumulator(with_logprobs=with_logprobs)
    async for response in responses:
        item = acc.add(response)
        if item is not None:
            yield item
    acc.result()
