"""asyncio VisionChat client over a grpc.aio channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

from .channel import ChannelOptions, channel_options, with_token
from .requests import DEFAULT_CHUNK_SIZE, PreparedRequest, PromptOrMessages, prepare_request
from .results import aiter_results, message_to_dict, token_count_from_proto
from .types import ChatResult, Delta, ImageSource, TokenCount, VideoLike

Metadata = Sequence[tuple[str, str]]


class AsyncVisionChatClient:
    """asyncio client; use as `async with AsyncVisionChatClient(target) as client:`.

    The channel is created on first use rather than in __init__, because a grpc.aio channel binds
    to the running event loop and the client may be constructed before one runs.
    `**sampling` keywords are those of client.requests.sampling_params.
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
        self.target = target
        self._options = channel_options(options)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.VisionChatServiceStub | None = None

    def _auth(self, metadata: Metadata | None) -> Metadata | None:
        return with_token(metadata, self.token)

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        return self._channel

    @property
    def stub(self) -> pb_grpc.VisionChatServiceStub:
        if self._stub is None:
            self._stub = pb_grpc.VisionChatServiceStub(self.channel)
        return self._stub

    async def close(self, grace: float | None = None) -> None:
        if self._channel is not None:
            await self._channel.close(grace)
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> AsyncVisionChatClient:
        self.channel  # noqa: B018 - create the channel inside the caller's loop
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel connects; raises asyncio.TimeoutError after `timeout`."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def stream_chat(
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
    ) -> AsyncIterator[Delta | ChatResult]:
        """Chat RPC with images streamed in chunks: yields Delta objects, then the ChatResult.

        Leaving the loop early cancels the call once the generator is closed; wrap it in
        contextlib.aclosing() to make that immediate.
        """
        prepared = await _prepare(
            prompt_or_messages,
            images,
            system=system,
            videos=videos,
            num_crops=num_crops,
            request_id=request_id,
            **sampling,
        )
        call = self.stub.Chat(prepared.chat_requests(chunk_size), timeout=timeout, metadata=self._auth(metadata))
        try:
            async for item in aiter_results(call, with_logprobs=prepared.wants_logprobs):
                yield item
        finally:
            _cancel(call)

    async def chat(
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
        return await _last(
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

    async def stream_generate(
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
    ) -> AsyncIterator[Delta | ChatResult]:
        """Generate RPC (images inline in one request): yields Delta objects, then the ChatResult."""
        prepared = await _prepare(
            prompt_or_messages,
            images,
            system=system,
            videos=videos,
            num_crops=num_crops,
            request_id=request_id,
            **sampling,
        )
        call = self.stub.Generate(prepared.generate_request(), timeout=timeout, metadata=self._auth(metadata))
        try:
            async for item in aiter_results(call, with_logprobs=prepared.wants_logprobs):
                yield item
        finally:
            _cancel(call)

    async def generate(
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
        return await _last(
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

    async def count_tokens(
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
        prepared = await _prepare(prompt_or_messages, images, system=system, videos=videos, num_crops=num_crops)
        response = await self.stub.CountTokens(
            prepared.count_tokens_request(), timeout=timeout, metadata=self._auth(metadata)
        )
        return token_count_from_proto(response)

    async def model_info(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> dict[str, Any]:
        """GetModelInfoResponse as a dict with proto field names (see results.message_to_dict)."""
        response = await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=self._auth(metadata)
        )
        return message_to_dict(response)


async def _prepare(
    prompt_or_messages: PromptOrMessages, images: Sequence[ImageSource], **kwargs: Any
) -> PreparedRequest:
    # Image files are read off the event loop so a slow disk does not stall other streams.
    return await asyncio.to_thread(prepare_request, prompt_or_messages, images, **kwargs)


def _cancel(call: grpc.aio.Call) -> None:
    # A no-op after normal completion; when the caller abandons the stream (break + aclose, task
    # cancellation, an exception) it makes the server stop generating for nobody.
    call.cancel()


async def _last(items: AsyncIterator[Delta | ChatResult]) -> ChatResult:
    result: ChatResult | None = None
    async for item in items:
        if isinstance(item, ChatResult):
            result = item
    assert result is not None  # aiter_results raises before ending without one
    return result
