"""Routes requests to worker processes and their step reports back to the waiting streams.

Placement: the live worker with the fewest requests not yet started, then the most free KV blocks.
A worker that dies, or that has work but reports no step within the stall timeout (the watchdog then
kills it), loses its requests: those that had produced no token yet are retried once on another
worker, invisibly to the client; the others fail with `WorkerLost`. The worker is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .engine import EngineRequest, RequestOutput, RequestRefused, check_fits
from .worker.handle import WorkerHandle
from .worker.protocol import AbortRequest, AddRequest, Rejected, StepReport, WorkerReady, WorkerSettings

log = logging.getLogger("visionchat.router")


class NoWorkerAvailable(Exception):
    pass


class WorkerLost(Exception):
    pass


class RouterObserver(Protocol):
    """Receives what the router sees; the metrics module implements it."""

    def worker_ready(self, worker: WorkerHandle, msg: WorkerReady) -> None: ...
    def worker_step(self, worker: WorkerHandle, report: StepReport) -> None: ...
    def worker_stalled(self, worker: WorkerHandle) -> None: ...
    def worker_died(self, worker: WorkerHandle) -> None: ...


@dataclass
class RequestStream:
    request: EngineRequest
    worker: WorkerHandle
    queue: asyncio.Queue[RequestOutput | Exception] = field(default_factory=asyncio.Queue)
    produced: bool = False  # the worker produced a token: the request can no longer move elsewhere
    retried: bool = False
    started: bool = False  # the consumer has received a token
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

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
                item = item.merged_with(following)
            if isinstance(item, Exception):
                self.finished = True
                raise item
            self.started = self.started or bool(item.tokens)
            if item.finished:
                self.finished = True
            yield item


class Router:
    def __init__(
        self,
        settings: list[WorkerSettings],
        observers: list[RouterObserver],
        context: Any,
        stall_timeout: float,
    ) -> None:
        self.workers = [WorkerHandle(s, self._on_message, self._on_exit, context) for s in settings]
        self.observers = observers
        self.stall_timeout = stall_timeout
        self.streams: dict[str, RequestStream] = {}
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # Set when a worker dies before it was ever ready: a bad model or device, not a crash to retry.
        self.startup_failed = asyncio.Event()

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        if self.stall_timeout > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

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

    def _choose(self, exclude: WorkerHandle | None = None) -> WorkerHandle:
        live = [w for w in self.workers if w.alive and w is not exclude]
        if not live:
            raise NoWorkerAvailable("no worker is ready (starting or restarting); retry shortly")
        waiting = {w.name: 0 for w in live}
        for s in self.streams.values():
            if not s.produced and s.worker.name in waiting:
                waiting[s.worker.name] += 1
        return min(live, key=lambda w: (waiting[w.name], -(w.state.stats.kv_blocks_free if w.state.stats else 0)))

    def _check_fits(self, worker: WorkerHandle, request: EngineRequest) -> None:
        self._check_sizes_fit(
            worker,
            len(request.prompt_ids),
            request.sampling.max_new_tokens,
            max((img.num_tokens for img in request.images), default=0),
        )

    def _check_sizes_fit(
        self, worker: WorkerHandle, prompt_tokens: int, max_new_tokens: int, largest_image_tokens: int
    ) -> None:
        info = worker.state.info
        if info is None:
            return
        config = info.engine
        check_fits(
            prompt_tokens,
            max_new_tokens,
            config.max_model_len,
            info.stats.kv_blocks_total,
            config.block_size,
            largest_image_tokens,
            config.max_image_embed_tokens,
        )

    def check_could_fit(self, min_prompt_tokens: int, max_new_tokens: int, largest_image_tokens: int) -> None:
        """Refuse what even the roomiest worker could never hold, from a lower bound on the prompt's
        tokens: called before a request's images or video frames are decoded."""
        known = [w for w in self.workers if w.state.info is not None]
        if known:
            roomiest = max(known, key=lambda w: w.state.info.stats.kv_blocks_total if w.state.info else 0)
            self._check_sizes_fit(roomiest, min_prompt_tokens, max_new_tokens, largest_image_tokens)

    def _assign(self, stream: RequestStream, worker: WorkerHandle) -> None:
        if not any(s.worker is worker for s in self.streams.values() if s is not stream):
            worker.state.last_heard = time.monotonic()  # the stall clock starts with its first work
        stream.worker = worker

    async def submit(self, request: EngineRequest) -> RequestStream:
        worker = self._choose()
        self._check_fits(worker, request)
        stream = RequestStream(request, worker)
        self._assign(stream, worker)
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
        self._spawn(self._send_quietly(stream.worker, AbortRequest(request_id)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, worker: WorkerHandle, msg: Any) -> None:
        try:
            await worker.send(msg)
        except (ConnectionError, OSError):
            pass  # the worker is gone; its requests went with it

    def _on_message(self, worker: WorkerHandle, msg: Any) -> None:
        if isinstance(msg, StepReport):
            worker.state.stats = msg.stats
            for out in msg.outputs:
                stream = self.streams.get(out.request_id)
                if stream is None or stream.worker is not worker:
                    continue  # aborted by the frontend, or already moved to another worker
                stream.produced = stream.produced or bool(out.tokens)
                stream.queue.put_nowait(out)
                if out.finished:
                    self.streams.pop(out.request_id, None)
            for observer in self.observers:
                observer.worker_step(worker, msg)
        elif isinstance(msg, Rejected):
            stream = self.streams.get(msg.request_id)
            if stream is not None and stream.worker is worker:
                self.streams.pop(msg.request_id)
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
        lost = [s for s in self.streams.values() if s.worker is worker]
        moved = 0
        for stream in lost:
            if not stream.produced and not stream.retried:
                moved += 1
                self._spawn(self._retry(stream, worker))
            else:
                self.streams.pop(stream.request_id, None)
                stream.queue.put_nowait(WorkerLost(f"{worker.name} died while serving this request; retry"))
        for observer in self.observers:
            observer.worker_died(worker)
        log.warning("%s lost %d requests (%d moved to another worker)", worker.name, len(lost), moved)
        if not self.draining:
            worker.restart()

    async def _retry(self, stream: RequestStream, dead: WorkerHandle) -> None:
        """Send a request that never produced a token to another live worker (once)."""
        stream.retried = True
        deadline = time.monotonic() + max(self.stall_timeout, 30.0)
        exclude: WorkerHandle | None = dead
        while self.streams.get(stream.request_id) is stream:
            try:
                worker = self._choose(exclude)
            except NoWorkerAvailable:
                if time.monotonic() > deadline or self.draining:
                    break
                await asyncio.sleep(0.1)  # e.g. the only worker restarting: once back, it will do
                exclude = None
                continue
            self._assign(stream, worker)
            try:
                await worker.send(AddRequest(stream.request))
                return
            except (ConnectionError, OSError):
                continue
        if self.streams.pop(stream.request_id, None) is stream:
            stream.queue.put_nowait(
                WorkerLost("the worker serving this request died and no other worker is ready; retry")
            )

    async def _watch(self) -> None:
        """Kill a worker that has work but has reported nothing for `stall_timeout` seconds."""
        period = min(1.0, self.stall_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for worker in self.workers:
                if not worker.alive or not any(s.worker is worker for s in self.streams.values()):
                    continue
                silent = now - worker.state.last_heard
                if silent > self.stall_timeout:
                    log.error(
                        "%s has reported no step for %.1fs (--worker-stall-timeout %.1fs): killing it",
                        worker.name,
                        silent,
                        self.stall_timeout,
                    )
                    worker.kill()
                    for observer in self.observers:
                        observer.worker_stalled(worker)

    async def stop(self) -> None:
        self.draining = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(w.stop() for w in self.workers))
