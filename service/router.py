"""Routes requests to worker processes and their step reports back to the waiting streams.

Placement: the live worker with the fewest requests not yet started, then the most free KV blocks.
Load shedding: past `max_queued_requests` requests that have not produced a token yet, `submit`
raises `Overloaded`. A worker that dies fails only its own requests (`WorkerLost`) and is restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .engine import EngineRequest, RequestOutput, RequestRefused, check_fits
from .worker.handle import WorkerHandle
from .worker.protocol import AbortRequest, AddRequest, Rejected, StepReport, WorkerReady, WorkerSettings

log = logging.getLogger("visionchat.router")


class Overloaded(Exception):
    def __init__(self, waiting: int, limit: int, retry_after: float) -> None:
        super().__init__(f"{waiting} requests are waiting (limit --max-queued-requests {limit}); retry later")
        self.retry_after = retry_after


class NoWorkerAvailable(Exception):
    pass


class WorkerLost(Exception):
    pass


class RouterObserver(Protocol):
    """Receives what the router sees; the metrics module implements it."""

    def worker_ready(self, worker: WorkerHandle, msg: WorkerReady) -> None: ...
    def worker_step(self, worker: WorkerHandle, report: StepReport) -> None: ...
    def worker_died(self, worker: WorkerHandle) -> None: ...


@dataclass
class RequestStream:
    request_id: str
    worker: WorkerHandle
    queue: asyncio.Queue[RequestOutput | Exception] = field(default_factory=asyncio.Queue)
    started: bool = False
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Outputs in order. Whatever queued up while the consumer was busy comes as one merged
        output, so a loaded frontend sends fewer, larger deltas instead of falling further behind."""
        while not self.finished:
            item = await self.queue.get()
            while not isinstance(item, Exception) and not item.finished and not self.queue.empty():
                following = self.queue.get_nowait()
                if isinstance(following, Exception):
                    self.queue.put_nowait(following)  # raised on the next turn, after these tokens
                    break
                item = _merge(item, following)
            if isinstance(item, Exception):
                self.finished = True
                raise item
            self.started = True
            if item.finished:
                self.finished = True
            yield item


def _merge(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    return RequestOutput(
        request_id=first.request_id,
        tokens=first.tokens + second.tokens,
        finish_reason=second.finish_reason,
        error=second.error,
        num_prompt_tokens=first.num_prompt_tokens,
        num_cached_tokens=first.num_cached_tokens if first.queue_seconds is not None else second.num_cached_tokens,
        queue_seconds=first.queue_seconds if first.queue_seconds is not None else second.queue_seconds,
    )


class Router:
    def __init__(self, settings: list[WorkerSettings], max_queued_requests: int, observers: list[RouterObserver]) -> None:
        self.workers = [WorkerHandle(s, self._on_message, self._on_exit) for s in settings]
        self.max_queued_requests = max_queued_requests
        self.observers = observers
        self.streams: dict[str, RequestStream] = {}
        self._pending_sends: set[asyncio.Task[None]] = set()
        # Set when a worker dies before it was ever ready: a bad model or device, not a crash to retry.
        self.startup_failed = asyncio.Event()

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    @property
    def all_ready(self) -> bool:
        return all(w.alive for w in self.workers)

    @property
    def any_ready(self) -> bool:
        return any(w.alive for w in self.workers)

    async def wait_ready(self, timeout: float | None = None) -> None:
        async def _all() -> None:
            while not self.all_ready:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(_all(), timeout)

    def num_waiting(self) -> int:
        return sum(1 for s in self.streams.values() if not s.started)

    def _choose(self) -> WorkerHandle:
        live = [w for w in self.workers if w.alive]
        if not live:
            raise NoWorkerAvailable("no worker is ready (starting or restarting); retry shortly")
        waiting = {w.name: 0 for w in live}
        for s in self.streams.values():
            if not s.started and s.worker.name in waiting:
                waiting[s.worker.name] += 1
        return min(live, key=lambda w: (waiting[w.name], -(w.state.stats.kv_blocks_free if w.state.stats else 0)))

    async def submit(self, request: EngineRequest) -> RequestStream:
        waiting = self.num_waiting()
        if waiting >= self.max_queued_requests:
            raise Overloaded(waiting, self.max_queued_requests, retry_after=1.0)
        worker = self._choose()
        stats = worker.state.stats
        settings = worker.settings
        if stats is not None:
            check_fits(
                len(request.prompt_ids),
                request.sampling.max_new_tokens,
                settings.max_model_len,
                stats.kv_blocks_total,
                settings.config.block_size,
                max((img.num_tokens for img in request.images), default=0),
                settings.config.max_image_embed_tokens,
            )
        stream = RequestStream(request.request_id, worker)
        self.streams[request.request_id] = stream
        try:
            await worker.send(AddRequest(request))
        except (ConnectionError, OSError) as exc:
            self.streams.pop(request.request_id, None)
            raise NoWorkerAvailable(f"{worker.name} is unavailable: {exc}") from exc
        except BaseException:
            # Cancelled (client gone, deadline) while sending: the request may or may not have
            # reached the worker; abort it either way so nothing runs or waits for nobody.
            self.abort(request.request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request now (cancelled, deadline, stop string); its blocks are freed by the worker's next loop.

        Synchronous so that it also works from a handler that is being cancelled."""
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_abort(stream.worker, request_id))
        self._pending_sends.add(task)
        task.add_done_callback(self._pending_sends.discard)

    async def _send_abort(self, worker: WorkerHandle, request_id: str) -> None:
        try:
            await worker.send(AbortRequest(request_id))
        except (ConnectionError, OSError):
            pass  # the worker is gone; its requests went with it

    def _on_message(self, worker: WorkerHandle, msg: Any) -> None:
        if isinstance(msg, StepReport):
            worker.state.stats = msg.stats
            for out in msg.outputs:
                stream = self.streams.get(out.request_id)
                if stream is None:
                    continue  # aborted by the frontend; the worker's cancel confirmation
                stream.queue.put_nowait(out)
                if out.finished:
                    self.streams.pop(out.request_id, None)
            for observer in self.observers:
                observer.worker_step(worker, msg)
        elif isinstance(msg, Rejected):
            stream = self.streams.pop(msg.request_id, None)
            if stream is not None:
                stream.queue.put_nowait(RequestRefused(msg.limit, msg.message))
        elif isinstance(msg, WorkerReady):
            log.info("%s ready: %s %s, %d KV blocks", worker.name, msg.device, msg.dtype, msg.stats.kv_blocks_total)
            for observer in self.observers:
                observer.worker_ready(worker, msg)

    def _on_exit(self, worker: WorkerHandle) -> None:
        if not worker.state.ever_ready:
            log.error("%s died during start-up", worker.name)
            self.startup_failed.set()
            return
        lost = [rid for rid, s in self.streams.items() if s.worker is worker]
        for rid in lost:
            self.streams.pop(rid).queue.put_nowait(WorkerLost(f"{worker.name} died while serving this request; retry"))
        for observer in self.observers:
            observer.worker_died(worker)
        log.warning("%s lost %d requests; restarting", worker.name, len(lost))
        worker.restart()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))

