"""A bounded pool of preprocessing processes.

Heavy request preparation (image decoding, the HD transform, tokenizing long text) runs here, in
processes of lower priority than the event loop and the model workers, so a flood of huge images
costs the flood and not everyone else. At most `max_pending` jobs are queued or running; past that
the pool refuses at once (`Overloaded`), which the API reports as RESOURCE_EXHAUSTED.

The processes fork from a forkserver that has imported the preprocessing code once, so they start
in milliseconds and share those pages.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from ..errors import Overloaded
from . import job as job_module

J = TypeVar("J")
R = TypeVar("R")

log = logging.getLogger("visionchat.preprocess")
NICE = 10


class PoolBroken(Exception):
    """A preprocessing process died (e.g. killed for memory); the pool was restarted."""


class PreprocessPool:
    def __init__(self, model_dir: str, processes: int, max_pending: int) -> None:
        self.model_dir = model_dir
        self.processes = processes
        self.max_pending = max_pending
        self.pending = 0
        self._ctx = mp.get_context("forkserver")
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=self._ctx,
            initializer=job_module.init_process,
            initargs=(self.model_dir, NICE),
        )

    async def start(self) -> None:
        """Start every process now (each loads the tokenizer), not on the first requests."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, job_module.ping) for _ in range(self.processes)))

    async def run(self, fn: Callable[[J], R], job: J, on_abandon: Callable[[], None] = lambda: None) -> R:
        """fn(job) in a pool process (fn: a function of `job_module`, whose process state it may use);
        Overloaded when the pool's queue is full. If the caller goes away while the job runs,
        `on_abandon` is called once the job is over (its files may exist only then)."""
        if self.pending >= self.max_pending:
            raise Overloaded(
                f"{self.pending} requests are being preprocessed (limit {self.max_pending}, "
                f"--max-preprocess-queue); retry later"
            )
        self.pending += 1
        future: Future[R] = self._executor.submit(fn, job)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            self._restart()
            raise PoolBroken("a preprocessing process died while preparing this request; retry") from None
        except BaseException:
            if not future.cancel():  # already running: clean up behind it
                future.add_done_callback(lambda _f: on_abandon())
            else:
                on_abandon()
            raise
        finally:
            self.pending -= 1

    def _restart(self) -> None:
        log.error("a preprocessing process died; restarting the pool")
        broken, self._executor = self._executor, self._new_executor()
        broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
