"""The visionchat.v1.VisionChatService servicer: gRPC in, EngineRequests to the router, text deltas out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import grpc
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

from .. import __version__
from ..config import ServerConfig
from ..engine import EngineRequest, FinishReason, ImagePayload, RequestRefused
from ..metrics import Metrics
from ..model.config import ModelConfig
from ..processor.image import MAX_NUM_CROPS
from ..processor.prompt import PromptBuilder
from ..router import NoWorkerAvailable, Overloaded, Router, WorkerLost
from .detokenizer import IncrementalDetokenizer
from .errors import ApiError, invalid_argument, resource_exhausted, unavailable
from .inputs import (
    DEFAULT_NUM_CROPS_MULTI,
    DEFAULT_NUM_CROPS_SINGLE,
    Call,
    PreparedPrompt,
    check_image_limits,
    convert_messages,
    prepare,
    resolve_num_crops,
    sampling_options,
    validate_sampling,
)

log = logging.getLogger("visionchat.requests")
SERVICE = "visionchat.v1.VisionChatService"
T = TypeVar("T")
# Chat and Generate stream messages of the same shape under their own names.
Response = pb.ChatResponse | pb.GenerateResponse

FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
# Which request field a worker's refusal is about.
REFUSAL_FIELD = {
    "max_context_tokens": "sampling.max_new_tokens",
    "kv_cache_memory": "sampling.max_new_tokens",
    "max_image_embed_tokens": "images",
}


@dataclass
class ServingState:
    draining: bool = False
    # Chat/Generate calls admitted and not yet finished, uploads and preparation included: the drain
    # on SIGTERM waits for these, not only for requests already on a worker.
    in_flight: int = 0


@dataclass
class _Outcome:
    reason: FinishReason = FinishReason.CANCELLED
    worker: str = "-"
    completion_tokens: int = 0
    queue_seconds: float | None = None
    ttft_seconds: float | None = None
    cached_tokens: int = 0


class VisionChatServiceServicer(pb_grpc.VisionChatServiceServicer):
    def __init__(
        self,
        config: ServerConfig,
        model_config: ModelConfig,
        builder: PromptBuilder,
        router: Router,
        metrics: Metrics,
        executor: Executor,
        state: ServingState,
        context_len: int,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.builder = builder
        self.router = router
        self.metrics = metrics
        self.executor = executor
        self.state = state
        self.context_len = context_len
        self.eos_token_ids = builder.eos_token_ids

    # --- RPC bookkeeping -------------------------------------------------------------------------

    @contextmanager
    def _observe(self, method: str, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except ApiError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self.metrics.grpc_handled.labels(SERVICE, method, kind, code.name).inc()
            self.metrics.grpc_seconds.labels(SERVICE, method, kind).observe(time.perf_counter() - start)
            if code is not grpc.StatusCode.OK:
                self.metrics.failed.labels(code.name).inc()

    async def _abort(self, context: grpc.aio.ServicerContext, exc: ApiError) -> None:
        await context.abort(exc.status.code, exc.status.details, exc.status.trailing_metadata)

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[T]]) -> T:
        try:
            with self._observe(method, "unary"):
                if self.state.draining:
                    raise unavailable("the server is shutting down; retry on another replica")
                return await body()
        except ApiError as exc:
            await self._abort(context, exc)
            raise  # unreachable: abort raises

    async def _streaming(
        self, method: str, kind: str, context: grpc.aio.ServicerContext, body: AsyncIterator[Response]
    ) -> AsyncIterator[Response]:
        try:
            with self._observe(method, kind):
                async for item in body:
                    yield item
        except ApiError as exc:
            await self._abort(context, exc)

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        if self.state.draining:
            raise unavailable("the server is shutting down; retry on another replica")
        self.state.in_flight += 1
        try:
            yield
        finally:
            self.state.in_flight -= 1

    # --- RPCs ------------------------------------------------------------------------------------

    # grpc.aio recognises streaming handlers by being async generator functions, hence the re-yield.
    async def Chat(self, request_iterator: AsyncIterator[pb.ChatRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatResponse]:
        async for response in self._streaming("Chat", "bidi_stream", context, self._chat(request_iterator)):
            yield response

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        async for response in self._streaming("Generate", "server_stream", context, self._generate_inline(request)):
            yield response

    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        return await self._unary("CountTokens", context, lambda: self._count_tokens(request))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return await self._unary("GetModelInfo", context, self._model_info)

    # --- bodies ----------------------------------------------------------------------------------

    async def _generate_inline(self, request: pb.GenerateRequest) -> AsyncIterator[Response]:
        with self._admitted():
            check_image_limits(self.config, [len(b) for b in request.images])
            call = Call(
                messages=convert_messages(request.messages),
                images=tuple(request.images),
                sampling=request.sampling,
                num_crops=resolve_num_crops(request.image_options),
                request_id=request.request_id,
            )
            async for item in self._run(call, pb.GenerateResponse):
                yield item

    async def _chat(self, requests: AsyncIterator[pb.ChatRequest]) -> AsyncIterator[pb.ChatResponse]:
        with self._admitted():
            call = await self._read_upload(requests)
            async for item in self._run(call, pb.ChatResponse):
                yield item

    async def _read_upload(self, requests: AsyncIterator[pb.ChatRequest]) -> Call:
        it = requests.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            raise invalid_argument("start", "the stream closed before the start message") from None
        if first.WhichOneof("kind") != "start":
            raise invalid_argument("start", "the first message of a Chat stream must be `start`")
        start = first.start
        count = start.image_count
        if count > self.config.max_images:
            raise invalid_argument(
                "start.image_count", f"{count} images exceed the limit of {self.config.max_images} per request (--max-images)"
            )
        buffers = [bytearray() for _ in range(count)]
        async for msg in it:
            kind = msg.WhichOneof("kind")
            if kind == "image_chunk":
                k = msg.image_chunk.image_index
                if k >= count:
                    raise invalid_argument(
                        "image_chunk.image_index", f"chunk for image {k}, but start.image_count is {count}"
                    )
                buffers[k] += msg.image_chunk.data
                # Refuse as soon as a limit is passed rather than buffering an oversized upload to the end.
                check_image_limits(self.config, [len(b) for b in buffers])
            elif kind == "end_of_input":
                break
            elif kind == "start":
                raise invalid_argument("start", "`start` may be sent only once")
            else:
                raise invalid_argument("kind", "empty ChatRequest message")
        else:
            raise invalid_argument("end_of_input", "the stream closed without end_of_input; the upload may be incomplete")
        for k, buf in enumerate(buffers):
            if not buf:
                raise invalid_argument(f"images[{k}]", "no bytes were received for this image")
        return Call(
            messages=convert_messages(start.messages),
            images=tuple(bytes(b) for b in buffers),
            sampling=start.sampling,
            num_crops=resolve_num_crops(start.image_options),
            request_id=start.request_id,
        )

    async def _prepare(self, call: Call) -> PreparedPrompt:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, prepare, call, self.builder, self.config)

    async def _run(self, call: Call, response: type[Response]) -> AsyncIterator[Response]:
        arrival = time.time()
        validate_sampling(call.sampling, self.config, self.model_config.vocab_size)
        prepared = await self._prepare(call)
        options = sampling_options(call.sampling, len(prepared.prompt_ids), self.config, self.context_len, self.eos_token_ids)
        request_id = call.request_id or uuid.uuid4().hex
        engine_id = f"{request_id}#{uuid.uuid4().hex[:8]}"  # unique even if a client reuses its id
        request = EngineRequest(
            request_id=engine_id,
            prompt_ids=prepared.prompt_ids,
            images=tuple(ImagePayload(data, info.num_crops, info.tokens) for data, info in zip(call.images, prepared.images)),
            sampling=options,
            arrival_time=arrival,
        )
        try:
            stream = await self.router.submit(request)
        except Overloaded as exc:
            raise resource_exhausted(str(exc), exc.retry_after) from exc
        except NoWorkerAvailable as exc:
            raise unavailable(str(exc)) from exc
        except RequestRefused as exc:
            raise invalid_argument(REFUSAL_FIELD.get(exc.limit, exc.limit), str(exc)) from exc

        outcome = _Outcome(worker=stream.worker.name)
        detok = IncrementalDetokenizer(self.builder.tokenizer, list(call.sampling.stop))
        last_token_time: float | None = None
        matched_stop = ""
        error_message = ""
        done = False
        try:
            async for out in stream:
                now = time.time()
                if out.queue_seconds is not None:
                    outcome.queue_seconds = out.queue_seconds
                    outcome.cached_tokens = out.num_cached_tokens
                if out.tokens:
                    if outcome.ttft_seconds is None:
                        outcome.ttft_seconds = now - arrival
                        self.metrics.ttft.labels(outcome.worker).observe(outcome.ttft_seconds)
                    elif last_token_time is not None:
                        # Several tokens may arrive merged (a busy frontend): spread the gap over them.
                        gap = (now - last_token_time) / len(out.tokens)
                        itl = self.metrics.itl.labels(outcome.worker)
                        for _ in out.tokens:
                            itl.observe(gap)
                    last_token_time = now
                    outcome.completion_tokens += len(out.tokens)
                    self.metrics.generation_tokens.labels(outcome.worker).inc(len(out.tokens))
                text = detok.add([t.token_id for t in out.tokens], final=out.finished)
                if text.stop is not None:
                    matched_stop = text.stop
                    outcome.reason = FinishReason.STOP_STRING
                    self.router.abort(engine_id)
                elif out.finished:
                    outcome.reason = out.finish_reason or FinishReason.ERROR
                    error_message = out.error or ""
                    if outcome.reason is FinishReason.STOP_TOKEN and out.tokens:
                        matched_stop = self.builder.tokenizer.convert_ids_to_tokens(out.tokens[-1].token_id) or ""
                if out.tokens or text.text:
                    yield response(delta=pb.ChatDelta(text=text.text, tokens=[_token_info(t) for t in out.tokens]))
                if text.stop is not None or out.finished:
                    done = True
                    break
        except WorkerLost as exc:
            outcome.reason = FinishReason.ERROR
            raise unavailable(str(exc)) from exc
        except RequestRefused as exc:
            outcome.reason = FinishReason.ERROR
            raise invalid_argument(REFUSAL_FIELD.get(exc.limit, exc.limit), str(exc)) from exc
        finally:
            if not done:
                self.router.abort(engine_id)
            self._finish(request_id, outcome, prepared, arrival)
        total = time.time() - arrival
        yield response(
            finished=pb.ChatFinished(
                finish_reason=FINISH[outcome.reason],
                usage=pb.Usage(
                    prompt_tokens=len(prepared.prompt_ids),
                    image_tokens=prepared.image_tokens,
                    completion_tokens=outcome.completion_tokens,
                    cached_tokens=outcome.cached_tokens,
                ),
                timings=pb.Timings(
                    queue_seconds=outcome.queue_seconds or 0.0,
                    time_to_first_token_seconds=outcome.ttft_seconds or 0.0,
                    total_seconds=total,
                ),
                request_id=request_id,
                matched_stop=matched_stop,
                error_message=error_message,
            )
        )

    def _finish(self, request_id: str, outcome: _Outcome, prepared: PreparedPrompt, arrival: float) -> None:
        total = time.time() - arrival
        self.metrics.request_finished(
            outcome.worker,
            outcome.reason.value,
            prompt_tokens=len(prepared.prompt_ids),
            cached_tokens=outcome.cached_tokens,
            image_tokens=prepared.image_tokens,
            generation_tokens=outcome.completion_tokens,
            queue_seconds=outcome.queue_seconds,
            ttft_seconds=outcome.ttft_seconds,
            total_seconds=total,
        )
        record = {
            "event": "request_finished",
            "request_id": request_id,
            "worker": outcome.worker,
            "finish_reason": outcome.reason.value,
            "prompt_tokens": len(prepared.prompt_ids),
            "image_tokens": prepared.image_tokens,
            "completion_tokens": outcome.completion_tokens,
            "cached_tokens": outcome.cached_tokens,
            "queue_s": round(outcome.queue_seconds or 0.0, 6),
            "ttft_s": round(outcome.ttft_seconds or 0.0, 6),
            "total_s": round(total, 6),
        }
        log.info("request finished", extra={"fields": record})

    async def _count_tokens(self, request: pb.CountTokensRequest) -> pb.CountTokensResponse:
        check_image_limits(self.config, [len(b) for b in request.images])
        call = Call(
            messages=convert_messages(request.messages),
            images=tuple(request.images),
            sampling=pb.SamplingParams(),
            num_crops=resolve_num_crops(request.image_options),
            request_id="",
        )
        prepared = await self._prepare(call)
        return pb.CountTokensResponse(
            prompt_tokens=len(prepared.prompt_ids),
            text_tokens=len(prepared.prompt_ids) - prepared.image_tokens,
            image_tokens=prepared.image_tokens,
            images=[
                pb.ImageTokenCount(image_index=k, width=i.width, height=i.height, num_crops=i.num_crops, tokens=i.tokens)
                for k, i in enumerate(prepared.images)
            ],
        )

    async def _model_info(self) -> pb.GetModelInfoResponse:
        workers = []
        dtype = ""
        for w in self.router.workers:
            stats = w.state.stats
            info = w.state.info
            dtype = info.dtype if info else dtype
            workers.append(
                pb.WorkerInfo(
                    name=w.name,
                    device=w.settings.device,
                    alive=w.alive,
                    kv_blocks_total=stats.kv_blocks_total if stats else 0,
                    kv_blocks_free=stats.kv_blocks_free if stats else 0,
                    kv_block_size=w.settings.config.block_size,
                    running_requests=stats.num_running if stats else 0,
                    waiting_requests=stats.num_waiting if stats else 0,
                )
            )
        c = self.config
        return pb.GetModelInfoResponse(
            model_id=self.model_config.model_id,
            context_length=self.context_len,
            default_num_crops_single_image=DEFAULT_NUM_CROPS_SINGLE,
            default_num_crops_multi_image=DEFAULT_NUM_CROPS_MULTI,
            min_num_crops=1,
            max_num_crops=MAX_NUM_CROPS,
            limits=pb.Limits(
                max_images_per_request=c.max_images,
                max_image_bytes=c.max_image_bytes,
                max_total_image_bytes=c.max_total_image_bytes,
                max_image_pixels=c.max_image_pixels,
                max_context_tokens=self.context_len,
                max_new_tokens=c.max_new_tokens,
                max_receive_message_bytes=c.max_receive_message_bytes,
            ),
            workers=workers,
            server_version=__version__,
            dtype=dtype,
        )


def _token_info(token: Any) -> pb.TokenInfo:
    info = pb.TokenInfo(token_id=token.token_id)
    if token.logprob is not None:
        info.logprob = token.logprob
        info.top_logprobs.extend(pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in token.top_logprobs)
    return info

