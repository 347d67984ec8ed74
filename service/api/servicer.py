"""The visionchat.v1.VisionChatService servicer: gRPC in, EngineRequests to the router, text deltas out.

A chat call goes: cheap checks on the event loop (limits, request id, image headers, a lower bound
on the prompt's tokens) -> a queue slot (load shedding) -> preparation (service.preprocess: inline
for short text, else the bounded process pool) -> the router -> streamed deltas. Nothing heavy runs
on the event loop, and nothing heavy runs before the checks that could refuse the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from visionchat.v1 import visionchat_pb2 as pb

from .. import __version__
from ..config import ServerConfig
from ..engine import EngineRequest, FinishReason, RequestRefused
from ..errors import InvalidInput, Overloaded
from ..metrics import Metrics
from ..model.config import ModelConfig
from ..preprocess.pool import PoolBroken
from ..preprocess.preparer import Checked, Preparer
from ..preprocess.videos import VideoRequest
from ..processor.image import MAX_NUM_CROPS
from ..router import NoWorkerAvailable, Router, WorkerLost
from ..security.auth import current_tenant
from .admission import Slots, TenantSlots
from .detokenizer import IncrementalDetokenizer
from .errors import ApiError, deadline_exceeded, from_request_error, invalid_argument, unavailable
from .handlers import SERVICE, Malformed
from .inputs import (
    DEFAULT_NUM_CROPS_MULTI,
    DEFAULT_NUM_CROPS_SINGLE,
    DEFAULT_NUM_CROPS_VIDEO,
    Call,
    check_image_limits,
    check_request_id,
    check_video_limits,
    convert_messages,
    inline_videos,
    num_crops_for,
    resolve_num_crops,
    sampling_options,
    validate_sampling,
    video_options,
)
from .response_format import response_format

log = logging.getLogger("visionchat.requests")
T = TypeVar("T")
# Chat and Generate stream messages of the same shape under their own names.
Response = pb.ChatResponse | pb.GenerateResponse
# While draining, an upload that sends nothing for this long is cut off: a stalled upload would hold
# the drain for its whole grace period, while one still sending may finish.
DRAIN_UPLOAD_IDLE_SECONDS = 5.0

FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
    FinishReason.GRAMMAR_COMPLETE: pb.FINISH_REASON_GRAMMAR_COMPLETE,
}
# Which request field a worker's refusal is about.
REFUSAL_FIELD = {
    "max_context_tokens": "sampling.max_new_tokens",
    "max_context_tokens_prompt": "messages",
    "kv_cache_memory": "sampling.max_new_tokens",
    "kv_cache_memory_prompt": "messages",
    "max_image_embed_tokens": "images",
    "response_format": "sampling.response_format",
}


class ServingState:
    def __init__(self, config: ServerConfig) -> None:
        self.draining = False
        # Chat/Generate calls admitted and not yet finished, uploads and preparation included: the
        # drain on SIGTERM waits for these, not only for requests already on a worker.
        self.in_flight = 0
        # Requests between their cheap checks and their first token (preprocessing, waiting for a
        # worker, prefill): what --max-queued-requests bounds.
        self.queued = Slots(
            config.max_queued_requests, "requests are waiting for a first token", "--max-queued-requests"
        )
        self.uploads = Slots(config.max_concurrent_uploads, "Chat uploads are in progress", "--max-concurrent-uploads")
        self.tenants = TenantSlots(config.max_requests_per_tenant)


@dataclass
class _Outcome:
    reason: FinishReason = FinishReason.CANCELLED
    worker: str = "-"
    completion_tokens: int = 0
    queue_seconds: float | None = None
    ttft_seconds: float | None = None
    cached_tokens: int = 0


def _check_parsed(request: Any) -> None:
    if isinstance(request, Malformed):
        raise invalid_argument("request", request.description)


class VisionChatServiceServicer:
    def __init__(
        self,
        config: ServerConfig,
        model_config: ModelConfig,
        preparer: Preparer,
        router: Router,
        metrics: Metrics,
        state: ServingState,
        context_len: int,
        eos_token_ids: tuple[int, ...],
        tokenizer: Any,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.preparer = preparer
        self.router = router
        self.metrics = metrics
        self.state = state
        self.context_len = context_len
        self.eos_token_ids = eos_token_ids
        self.tokenizer = tokenizer

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
            self.metrics.tenant_request(current_tenant(), code.name)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: ApiError) -> None:
        await context.abort(exc.status.code, exc.status.details, exc.status.trailing_metadata)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Errors of the layers below become gRPC statuses."""
        try:
            yield
        except (InvalidInput, Overloaded) as exc:
            raise from_request_error(exc) from exc
        except PoolBroken as exc:
            raise unavailable(str(exc)) from exc

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[T]]) -> T:
        try:
            with self._observe(method, "unary"):
                if self.state.draining:
                    raise unavailable("the server is shutting down; retry on another replica")
                with self._translated():
                    return await body()
        except ApiError as exc:
            await self._abort(context, exc)
            raise  # unreachable: abort raises

    async def _streaming(
        self, method: str, kind: str, context: grpc.aio.ServicerContext, body: AsyncIterator[Response]
    ) -> AsyncIterator[Response]:
        try:
            with self._observe(method, kind):
                with self._translated():
                    async for item in body:
                        yield item
        except ApiError as exc:
            await self._abort(context, exc)

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        if self.state.draining:
            raise unavailable("the server is shutting down; retry on another replica")
        with self.state.tenants.take(current_tenant()):
            self.state.in_flight += 1
            try:
                yield
            finally:
                self.state.in_flight -= 1

    # --- RPCs ------------------------------------------------------------------------------------

    # grpc.aio recognises streaming handlers by being async generator functions, hence the re-yield.
    async def Chat(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        async for response in self._streaming("Chat", "bidi_stream", context, self._chat(request_iterator)):
            yield response

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Response]:
        async for response in self._streaming("Generate", "server_stream", context, self._generate_inline(request)):
            yield response

    async def CountTokens(self, request: Any, context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        return await self._unary("CountTokens", context, lambda: self._count_tokens(request))

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return await self._unary("GetModelInfo", context, lambda: self._model_info(request))

    # --- bodies ----------------------------------------------------------------------------------

    async def _generate_inline(self, request: pb.GenerateRequest | Malformed) -> AsyncIterator[Response]:
        with self._admitted():
            _check_parsed(request)
            assert isinstance(request, pb.GenerateRequest)
            check_image_limits(self.config, [len(b) for b in request.images])
            call = Call(
                messages=convert_messages(request.messages),
                images=tuple(request.images),
                sampling=request.sampling,
                num_crops=resolve_num_crops(request.image_options),
                request_id=request.request_id,
                videos=inline_videos(self.config, request.videos),
            )
            async for item in self._run(call, pb.GenerateResponse, None):
                yield item

    async def _chat(self, requests: AsyncIterator[Any]) -> AsyncIterator[Response]:
        with self._admitted():
            it = requests.__aiter__()
            with self.state.uploads.take():
                call = await self._read_upload(it)
            # The client half-closes after end_of_input; anything else it sends is an error.
            trailing = asyncio.ensure_future(self._expect_no_more(it))
            try:
                async for item in self._run(call, pb.ChatResponse, trailing):
                    yield item
            finally:
                trailing.cancel()
                if trailing.done() and not trailing.cancelled():
                    trailing.exception()  # seen (and raised) by _stream if it mattered

    async def _next_message(self, it: AsyncIterator[Any]) -> Any:
        """The next upload message, within --upload-idle-timeout (5 s while draining)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = asyncio.ensure_future(it.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=0.25)
                if done:
                    message = pending.result()
                    _check_parsed(message)
                    return message
                idle = loop.time() - start
                if idle > self.config.upload_idle_timeout:
                    raise deadline_exceeded(
                        f"no upload message for {idle:.1f}s (--upload-idle-timeout "
                        f"{self.config.upload_idle_timeout:g}s)"
                    )
                if self.state.draining and idle > DRAIN_UPLOAD_IDLE_SECONDS:
                    raise unavailable("the server is shutting down and this upload stalled; retry on another replica")
        finally:
            pending.cancel()

    async def _read_upload(self, it: AsyncIterator[Any]) -> Call:
        try:
            first = await self._next_message(it)
        except StopAsyncIteration:
            raise invalid_argument("start", "the stream closed before the start message") from None
        if first.WhichOneof("kind") != "start":
            raise invalid_argument("start", "the first message of a Chat stream must be `start`")
        start = first.start
        check_request_id(start.request_id)
        count = start.image_count
        if count > self.config.max_images:
            raise invalid_argument(
                "start.image_count",
                f"{count} images exceed the limit of {self.config.max_images} per request (--max-images)",
            )
        video_options_ = [video_options(o, f"start.videos[{v}]") for v, o in enumerate(start.videos)]
        check_video_limits(self.config, [0] * len(video_options_), "start.videos")
        buffers = [bytearray() for _ in range(count)]
        video_buffers = [bytearray() for _ in video_options_]
        while True:
            try:
                msg = await self._next_message(it)
            except StopAsyncIteration:
                raise invalid_argument(
                    "end_of_input", "the stream closed without end_of_input; the upload may be incomplete"
                ) from None
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
            elif kind == "video_chunk":
                v = msg.video_chunk.video_index
                if v >= len(video_buffers):
                    raise invalid_argument(
                        "video_chunk.video_index",
                        f"chunk for video {v}, but start.videos has {len(video_buffers)} entries",
                    )
                video_buffers[v] += msg.video_chunk.data
                check_video_limits(self.config, [len(b) for b in video_buffers])
            elif kind == "end_of_input":
                break
            elif kind == "start":
                raise invalid_argument("start", "`start` may be sent only once")
            else:
                raise invalid_argument("kind", "empty ChatRequest message")
        for k, buf in enumerate(buffers):
            if not buf:
                raise invalid_argument(f"images[{k}]", "no bytes were received for this image")
        for v, buf in enumerate(video_buffers):
            if not buf:
                raise invalid_argument(f"videos[{v}]", "no bytes were received for this video")
        return Call(
            messages=convert_messages(start.messages),
            images=tuple(bytes(b) for b in buffers),
            sampling=start.sampling,
            num_crops=resolve_num_crops(start.image_options),
            request_id=start.request_id,
            videos=tuple(VideoRequest(bytes(b), o) for b, o in zip(video_buffers, video_options_, strict=True)),
        )

    async def _expect_no_more(self, it: AsyncIterator[Any]) -> None:
        try:
            await it.__anext__()
        except StopAsyncIteration:
            return
        raise invalid_argument("end_of_input", "the stream sent more messages after end_of_input")

    def _check(self, call: Call) -> Checked:
        validate_sampling(call.sampling, self.config, self.model_config.vocab_size)
        check_request_id(call.request_id)
        return self.preparer.check(
            call.messages,
            call.images,
            num_crops_for(call),
            call.sampling.max_new_tokens,
            call.videos,
            response_format(call.sampling),
        )

    async def _run(
        self, call: Call, response: type[Response], trailing: asyncio.Future[None] | None
    ) -> AsyncIterator[Response]:
        arrival = time.time()
        checked = self._check(call)
        with self.state.queued.take() as queue_slot:
            checked = await self.preparer.plan(checked, call.sampling.max_new_tokens)
            try:  # before anything is decoded: a 64-frame video that no KV pool holds costs no decoding
                self.router.check_could_fit(
                    self.preparer.min_prompt_tokens(checked),
                    max(call.sampling.max_new_tokens, 1),
                    checked.largest_image_tokens,
                )
            except RequestRefused as exc:
                raise invalid_argument(REFUSAL_FIELD.get(exc.limit, exc.limit), str(exc)) from exc
            await self.preparer.check_format(checked.response_format)
            prepared = await self.preparer.prepare(checked)
            try:
                prompt = prepared.prompt
                self.metrics.preprocessed(prompt.seconds, len(prompt.images))
                for video, seconds in zip(checked.planned or (), prompt.video_decode_seconds, strict=False):
                    self.metrics.video_decoded(seconds, len(video.plan.frames), video.plan.frames_to_decode)
                options = sampling_options(
                    call.sampling,
                    prompt.num_prompt_tokens,
                    self.config,
                    self.context_len,
                    self.eos_token_ids,
                    checked.response_format,
                )
                request_id = call.request_id or uuid.uuid4().hex
                engine_id = f"{request_id}#{uuid.uuid4().hex[:8]}"  # unique even if a client reuses its id
                request = EngineRequest(
                    request_id=engine_id,
                    prompt_ids=prompt.prompt_ids,
                    images=prompt.images,
                    sampling=options,
                    arrival_time=arrival,
                )
                async for item in self._stream(
                    request, request_id, call, checked, response, arrival, queue_slot, trailing
                ):
                    yield item
            finally:
                self.preparer.release(prepared.reservation)

    async def _stream(
        self,
        request: EngineRequest,
        request_id: str,
        call: Call,
        checked: Checked,
        response: type[Response],
        arrival: float,
        queue_slot: Any,
        trailing: asyncio.Future[None] | None,
    ) -> AsyncIterator[Response]:
        try:
            stream = await self.router.submit(request)
        except NoWorkerAvailable as exc:
            raise unavailable(str(exc)) from exc
        except RequestRefused as exc:
            raise invalid_argument(REFUSAL_FIELD.get(exc.limit, exc.limit), str(exc)) from exc

        engine_id = request.request_id
        num_prompt = len(request.prompt_ids)
        outcome = _Outcome(worker=stream.worker.name)
        detok = IncrementalDetokenizer(self.tokenizer, list(call.sampling.stop))
        last_token_time: float | None = None
        matched_stop = ""
        error_message = ""
        done = False
        try:
            async for out in stream:
                if trailing is not None and trailing.done():
                    trailing.result()  # raises for messages after end_of_input
                now = time.time()
                outcome.worker = stream.worker.name  # a retry may have moved it
                outcome.cached_tokens = max(outcome.cached_tokens, out.num_cached_tokens)
                if out.queue_seconds is not None:
                    outcome.queue_seconds = out.queue_seconds
                if out.tokens:
                    if outcome.ttft_seconds is None:
                        queue_slot.release()
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
                        matched_stop = self.tokenizer.convert_ids_to_tokens(out.tokens[-1].token_id) or ""
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
            self._finish(request_id, outcome, num_prompt, checked.image_tokens, arrival)
        total = time.time() - arrival
        yield response(
            finished=pb.ChatFinished(
                finish_reason=FINISH[outcome.reason],
                usage=pb.Usage(
                    prompt_tokens=num_prompt,
                    image_tokens=checked.image_tokens,
                    completion_tokens=outcome.completion_tokens,
                    cached_tokens=outcome.cached_tokens,
                    video_tokens=checked.video_tokens,
                ),
                timings=pb.Timings(
                    queue_seconds=outcome.queue_seconds or 0.0,
                    time_to_first_token_seconds=outcome.ttft_seconds or 0.0,
                    total_seconds=total,
                ),
                request_id=request_id,
                matched_stop=matched_stop,
                error_message=error_message,
                videos=_video_infos(checked),
            )
        )

    def _finish(
        self, request_id: str, outcome: _Outcome, prompt_tokens: int, image_tokens: int, arrival: float
    ) -> None:
        total = time.time() - arrival
        tenant = current_tenant()
        self.metrics.tenant_tokens(tenant, outcome.completion_tokens)
        self.metrics.request_finished(
            outcome.worker,
            outcome.reason.value,
            prompt_tokens=prompt_tokens,
            cached_tokens=outcome.cached_tokens,
            image_tokens=image_tokens,
            generation_tokens=outcome.completion_tokens,
            queue_seconds=outcome.queue_seconds,
            ttft_seconds=outcome.ttft_seconds,
            total_seconds=total,
        )
        record = {
            "event": "request_finished",
            "request_id": request_id,
            "tenant": tenant,
            "worker": outcome.worker,
            "finish_reason": outcome.reason.value,
            "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens,
            "completion_tokens": outcome.completion_tokens,
            "cached_tokens": outcome.cached_tokens,
            "queue_s": round(outcome.queue_seconds or 0.0, 6),
            "ttft_s": round(outcome.ttft_seconds or 0.0, 6),
            "total_s": round(total, 6),
        }
        log.info("request finished", extra={"fields": record})

    async def _count_tokens(self, request: pb.CountTokensRequest | Malformed) -> pb.CountTokensResponse:
        _check_parsed(request)
        assert isinstance(request, pb.CountTokensRequest)
        check_image_limits(self.config, [len(b) for b in request.images])
        call = Call(
            messages=convert_messages(request.messages),
            images=tuple(request.images),
            sampling=pb.SamplingParams(),
            num_crops=resolve_num_crops(request.image_options),
            request_id="",
            videos=inline_videos(self.config, request.videos),
        )
        checked = self.preparer.check(call.messages, call.images, num_crops_for(call), 0, call.videos)
        checked = await self.preparer.plan(checked, 0)
        prompt = await self.preparer.count(checked)
        return pb.CountTokensResponse(
            prompt_tokens=prompt.num_prompt_tokens,
            text_tokens=prompt.num_prompt_tokens - checked.image_tokens,
            image_tokens=checked.image_tokens,
            video_tokens=checked.video_tokens,
            videos=_video_infos(checked),
            images=[
                pb.ImageTokenCount(
                    image_index=k,
                    width=p.header.width,
                    height=p.header.height,
                    num_crops=p.num_crops,
                    tokens=p.tokens,
                    processed_width=p.processed_size[1],
                    processed_height=p.processed_size[0],
                    crops=p.tiles,
                )
                for k, p in enumerate(checked.plans)
            ],
        )

    async def _model_info(self, request: pb.GetModelInfoRequest | Malformed) -> pb.GetModelInfoResponse:
        _check_parsed(request)
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
                    kv_block_size=w.settings.engine.block_size,
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
                max_videos_per_request=c.max_videos,
                max_video_bytes=c.max_video_bytes,
                max_total_video_bytes=c.max_total_video_bytes,
                max_video_frames=c.max_video_frames,
                max_video_seconds=c.max_video_seconds,
                max_video_pixels=c.max_video_pixels,
            ),
            workers=workers,
            server_version=__version__,
            dtype=dtype,
            default_num_crops_video=DEFAULT_NUM_CROPS_VIDEO,
            default_video_frames=c.default_video_frames,
        )


def _video_infos(checked: Checked) -> list[pb.VideoInfo]:
    infos = []
    for v, video in enumerate(checked.planned or ()):
        plan = video.plan
        infos.append(
            pb.VideoInfo(
                video_index=v,
                width=plan.width,
                height=plan.height,
                duration_seconds=plan.duration_seconds,
                num_crops=video.request.options.num_crops,
                tokens=video.tokens,
                frames=[
                    pb.VideoFrameInfo(frame_index=f.index, timestamp_seconds=f.seconds, tokens=video.frame_tokens)
                    for f in plan.frames
                ],
                codec=plan.codec,
                frames_decoded=plan.frames_to_decode,
            )
        )
    return infos


def _token_info(token: Any) -> pb.TokenInfo:
    info = pb.TokenInfo(token_id=token.token_id)
    if token.logprob is not None:
        info.logprob = token.logprob
        info.top_logprobs.extend(pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in token.top_logprobs)
    return info
