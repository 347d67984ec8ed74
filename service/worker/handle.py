"""The frontend's handle on one worker process: start, send, receive, notice death, restart.

Receiving never blocks the event loop: the pipe's file descriptor is watched with `add_reader` and
read only when readable. Sending can block on a full pipe (a request with large images while the
worker is busy in a step), so sends go through this handle's own single-thread executor, which also
keeps them in order.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

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


class WorkerHandle:
    def __init__(
        self,
        settings: WorkerSettings,
        on_message: Callable[[WorkerHandle, Any], None],
        on_exit: Callable[[WorkerHandle], None],
    ) -> None:
        self.settings = settings
        self.name = f"worker{settings.index}"
        self._on_message = on_message
        self._on_exit = on_exit
        self._ctx = mp.get_context("spawn")
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ipc-send-{self.name}")
        self._conn: Connection | None = None
        self.process: mp.process.BaseProcess | None = None
        self.state = WorkerState()
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self.state.ready and self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        self.process = self._ctx.Process(target=worker_main, args=(child, self.settings), name=self.name, daemon=True)
        self.process.start()
        child.close()  # so the parent end sees EOF when the worker dies
        self._conn = parent
        self.state.ready = False
        asyncio.get_running_loop().add_reader(parent.fileno(), self._readable)

    def _readable(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while conn.poll():
                msg = conn.recv()
                if isinstance(msg, WorkerReady):
                    self.state.ready = True
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
        if self.process is not None:
            self.process.join(timeout=5)
        code = self.process.exitcode if self.process else None
        (log.info if self._stopping else log.warning)("%s (pid %s) exited with code %s", self.name, self.pid, code)
        if not self._stopping:
            self._on_exit(self)

    def restart(self) -> None:
        self.state.restarts += 1
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
