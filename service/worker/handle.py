"""The frontend's handle on one worker process: start, send, receive, notice death, kill, restart.

Receiving never blocks the event loop: the pipe's file descriptor is watched with `add_reader` and
read only when readable. Sending can block on a full pipe while the worker is busy in a step, so
sends go through this handle's own single-thread executor, which also keeps them in order.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..engine import EngineStats
from .process import worker_main
from .protocol import Shutdown, WorkerReady, WorkerSettings

log = logging.getLogger("visionchat.worker")


@dataclass
class WorkerState:
    ready: bool = False
    info: WorkerReady | None = None
    stats: EngineStats | None = None
    restarts: int = 0
    ever_ready: bool = False  # this worker has served before: a death is a crash to heal, not a bad setup
    failures_since_ready: int = 0  # deaths since it was last ready (restart backoff)
    last_heard: float = 0.0  # time.monotonic() of the last message from the process
    stalled: bool = False  # the watchdog gave up on it; it is being killed


class WorkerHandle:
    def __init__(
        self,
        settings: WorkerSettings,
        on_message: Callable[[WorkerHandle, Any], None],
        on_exit: Callable[[WorkerHandle], None],
        context: Any,  # a multiprocessing context (spawn)
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._on_message = on_message
        self._on_exit = on_exit
        self._ctx = context
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ipc-send-{self.name}")
        self._conn: Connection | None = None
        self.process: mp.process.BaseProcess | None = None
        self.state = WorkerState()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def alive(self) -> bool:
        return self.state.ready and not self.state.stalled and self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        self.process = self._ctx.Process(target=worker_main, args=(child, self.settings), name=self.name, daemon=True)
        self.process.start()
        child.close()  # so the parent end sees EOF when the worker dies
        self._conn = parent
        self.state.ready = self.state.stalled = False
        self.state.info = None
        self.state.last_heard = time.monotonic()
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable)

    def _readable(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while conn.poll():
                msg = conn.recv()
                self.state.last_heard = time.monotonic()
                if isinstance(msg, WorkerReady):
                    self.state.ready = self.state.ever_ready = True
                    self.state.failures_since_ready = 0
                    self.state.info = msg
                    self.state.stats = msg.stats
                self._on_message(self, msg)
        except (EOFError, OSError):
            self._closed()

    def _closed(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()
        self.state.ready = False
        self._spawn(self._reap())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self) -> None:
        """Wait for the dead worker off the event loop (a device teardown can take seconds), then report."""
        proc = self.process
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(self._sender, proc.join, 30)
            if proc.is_alive():
                proc.kill()
                await asyncio.get_running_loop().run_in_executor(self._sender, proc.join, 10)
        code = proc.exitcode if proc else None
        (log.info if self._stopping else log.warning)("%s (pid %s) exited with code %s", self.name, self.pid, code)
        if not self._stopping:
            self.state.failures_since_ready += 1
            self._on_exit(self)

    def kill(self) -> None:
        """Stop a stalled worker now (SIGKILL also ends a SIGSTOPped process); its pipe's EOF then
        goes the usual way of a dead worker: its requests are re-routed or failed, it restarts."""
        self.state.stalled = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def restart(self) -> None:
        """Start again after a back-off that grows while restarts keep failing (1 s, 2 s, ... 30 s)."""
        delay = 0.0 if self.state.failures_since_ready <= 1 else min(30.0, 2.0 ** (self.state.failures_since_ready - 1))
        log.warning("restarting %s in %.0fs", self.name, delay)
        self.state.restarts += 1
        self._spawn(self._start_after(delay))

    async def _start_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping:
            self.start()

    async def send(self, msg: Any) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionError(f"{self.name} is not running")
        await asyncio.get_running_loop().run_in_executor(self._sender, conn.send, msg)

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._conn is not None:
            try:
                await self.send(Shutdown())
            except (ConnectionError, OSError, BrokenPipeError):
                pass
        proc = self.process
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(self._sender, proc.join, timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self._conn is not None:
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()
            self._conn = None
        self._sender.shutdown(wait=False)
