"""Blocking VisionChat client over a grpc channel."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

from .channel import ChannelOptions, channel_options, with_token
from .requests import DEFAULT_CHUNK_SIZE, PromptOrMessages, prepare_request
from .results import iter_results, message_to_dict, token_count_from_proto
from .types import ChatResult, Delta, ImageSource, TokenCount, VideoLike

Metadata = Sequence[tuple[str, str]]


class VisionChatClient:
    """Synchronous client. Use as a context manager, or call close().

    `**sampling` keywords everywhere are those of client.requests.sampling_params: max_new_tokens,
    temperature, top_p, top_k, repetition_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs.
    """

    def __init__(
        self,
        target: str,
        *,
        options: ChannelOptions = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.token = token  # sent as `authorization: Bearer <token>` with every call
        opts = channel_options(options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        self._stub = pb_grpc.VisionChatServiceStub(self._channel)
        self.target = target

    # The raw channel and stub let tests send requests this API would never build.
    def _auth(self, metadata: Metadata | None) -> Metadata | None:
        return with_token(metadata, self.token)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    @property
    def stub(self) -> pb_grpc.VisionChatServiceStub:
        return self._stub

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VisionChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects; raises grpc.FutureTimeoutError after `timeout`."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def stream_chat(
        self,
        prompt_or_messages: PromptOrMessages,
        images: Sequence[ImageSource] = (),
        *,
        videos: Sequence[VideoLike] = (),
        system: str | None = None,
        num_crops: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
        request_id: str | None = None,
        metadata: Metadata | None = None,
        **sampling: Any,
    ) -> Iterator[Delta | ChatResult]:
        """Chat RPC with images streamed in chunks: yields Delta objects, then the ChatResult.

        The request is built and the call started here, so bad arguments fail at the call site.
        """
        prepared = prepare_request(
            prompt_or_messages,
            images,
            system=system,
            videos=videos,
            num_crops=num_crops,
            request_id=request_id,
            **sampling,
        )
        requests = prepared.chat_requests(chunk_size)
        call = self._stub.Chat(requests, timeout=timeout, metadata=self._auth(metadata))
        return _fold_and_cancel(call, prepared.wants_logprobs)

    def chat(
        self,
        prompt_or_messages: PromptOrMessages,
        images: Sequence[ImageSource] = (),
        *,
        videos: Sequence[VideoLike] = (),
        system: str | None = None,
        num_crops: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
        request_id: str | None = None,
        metadata: Metadata | None = None,
        **sampling: Any,
    ) -> ChatResult:
        """stream_chat collected into its final result."""
        return _last(
            self.stream_chat(
                prompt_or_messages,
                images,
                system=system,
                videos=videos,
                num_crops=num_crops,
                chunk_size=chunk_size,
                timeout=timeout,
                request_id=request_id,
                metadata=metadata,
                **sampling,
            )
        )

    def stream_generate(
        self,
        prompt_or_messages: PromptOrMessages,
        images: Sequence[ImageSource] = (),
        *,
        videos: Sequence[VideoLike] = (),
        system: str | None = None,
        num_crops: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        metadata: Metadata | None = None,
        **sampling: Any,
    ) -> Iterator[Delta | ChatResult]:
        """Generate RPC (images inline in one request): yields Delta objects, then the ChatResult."""
        prepared = prepare_request(
            prompt_or_messages,
            images,
            system=system,
            videos=videos,
            num_crops=num_crops,
            request_id=request_id,
            **sampling,
        )
        call = self._stub.Generate(prepared.generate_request(), timeout=timeout, metadata=self._auth(metadata))
        return _fold_and_cancel(call, prepared.wants_logprobs)

    def generate(
        self,
        prompt_or_messages: PromptOrMessages,
        images: Sequence[ImageSource] = (),
        *,
        videos: Sequence[VideoLike] = (),
        system: str | None = None,
        num_crops: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        metadata: Metadata | None = None,
        **sampling: Any,
    ) -> ChatResult:
        """stream_generate collected into its final result."""
        return _last(
            self.stream_generate(
                prompt_or_messages,
                images,
                system=system,
                videos=videos,
                num_crops=num_crops,
                timeout=timeout,
                request_id=request_id,
                metadata=metadata,
                **sampling,
            )
        )

    def count_tokens(
        self,
        prompt_or_messages: PromptOrMessages,
        images: Sequence[ImageSource] = (),
        *,
        videos: Sequence[VideoLike] = (),
        system: str | None = None,
        num_crops: int | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> TokenCount:
        prepared = prepare_request(prompt_or_messages, images, system=system, videos=videos, num_crops=num_crops)
        response = self._stub.CountTokens(
            prepared.count_tokens_request(), timeout=timeout, metadata=self._auth(metadata)
        )
        return token_count_from_proto(response)

    def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> dict[str, Any]:
        """GetModelInfoResponse as a dict with proto field names (see results.message_to_dict)."""
        response = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._auth(metadata))
        return message_to_dict(response)


def _fold_and_cancel(call: Any, with_logprobs: bool) -> Iterator[Delta | ChatResult]:
    try:
        yield from iter_results(call, with_logprobs=with_logprobs)
    finally:
        # A no-op after normal completion; when the caller abandons the iterator (break, error,
        # Ctrl-C) it tells the server to stop generating instead of finishing for nobody.
        call.cancel()


def _last(items: Iterator[Delta | ChatResult]) -> ChatResult:
    result: ChatResult | None = None
    for item in items:
        if isinstance(item, ChatResult):
            result = item
    assert result is not None  # iter_results raises before ending without one
    return result
