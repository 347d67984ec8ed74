"""The worker process: one device, one model copy, one engine, driven over a pipe.

The loop blocks on the pipe only while the engine is idle; while requests run it drains incoming
messages between steps, so new requests join the running batch at the next step. Everything
device-specific is the platform's (service.platform); this loop only does model work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from multiprocessing.connection import Connection

import torch

from ..engine import Engine, EngineRequest, RequestRefused
from ..logs import configure_logging
from ..model import load_model
from ..platform import Platform, platform_for
from ..processor.image import decode_count
from ..processor.prompt import PromptBuilder
from ..structured import Grammars
from .kv_budget import kv_budget
from .probes import warmup_request
from .protocol import AbortRequest, AddRequest, Rejected, Shutdown, StepReport, WorkerReady, WorkerSettings

log = logging.getLogger("visionchat.worker")

# Rows each linear role sees in service, for measuring the GEMM paths: a decode batch, a few vision
# tiles of 577 patches, the projector's rows for one image.
VISION_ROWS_PER_TILE = 577
PROJECTOR_ROWS = 1024


@torch.inference_mode()
def warm_up(engine: Engine, request: EngineRequest, platform: Platform) -> float:
    """Run the decoder, the sampler and the vision tower once, so no request pays for first calls;
    returns the vision tower's seconds per tile (one tile: a full-size tower on a CPU takes seconds)."""
    engine.run_to_completion([request])
    start = time.perf_counter()
    engine.model.vision.crop_features(torch.zeros(1, 3, 336, 336, device=engine.model.device), 1)
    platform.synchronize()
    return time.perf_counter() - start


def start_engine(settings: WorkerSettings) -> tuple[Engine, WorkerReady]:
    """Load the model on the device, give it the platform's fast paths, size the KV pool, warm up."""
    platform = platform_for(settings.device)
    platform.configure_process(settings.num_threads)
    dtype = platform.resolve_dtype(settings.dtype)
    # The shard progress bar is for people watching a terminal, not for JSON log pipelines.
    model, report = load_model(settings.model_dir, dtype, platform.device, progress=settings.log_format == "text")
    config = settings.engine
    rows = {
        "decoder": min(config.max_num_seqs, 16),
        "lm_head": min(config.max_num_seqs, 16),
        "vision": VISION_ROWS_PER_TILE,
        "projector": PROJECTOR_ROWS,
    }
    for choice in platform.prepare_model(model, rows, settings.cpu_gemm):
        log.info("gemm path: %s", choice)
    backend = platform.attention_backend(settings.attention_backend, settings.attention_workspace)
    kv_bytes = kv_budget(config, settings.kv_cache_fraction, model, backend, platform)
    config = dataclasses.replace(config, kv_cache_memory_bytes=kv_bytes)
    builder = PromptBuilder(settings.model_dir)  # the tokenizer and EOS ids the frontend uses too
    grammars = Grammars(builder.tokenizer, model.config.vocab_size, builder.eos_token_ids)
    engine = Engine(model, config, backend, platform, grammars)
    capacity = min(config.max_model_len, engine.pool.num_blocks * config.block_size)
    platform.measured_tile_seconds(warm_up(engine, warmup_request(model.config.eos_token_id, capacity), platform))
    engine.set_vision_tiles_per_step(platform.vision_tiles_per_step(config.vision_tiles_per_step))
    config = engine.config
    ready = WorkerReady(
        device=str(platform.device),
        dtype=str(dtype).removeprefix("torch."),
        attention_backend=backend.name,
        stats=engine.stats(),
        engine=config,
        load_seconds=report.seconds,
        pid=os.getpid(),
    )
    return engine, ready


def worker_main(conn: Connection, settings: WorkerSettings) -> None:
    # Ctrl-C reaches the whole process group; the frontend handles it and stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_format, settings.log_level)
    try:
        engine, ready = start_engine(settings)
        conn.send(ready)
        log.info(
            "ready on %s (%s, %d KV blocks, %d vision tiles per step)",
            ready.device,
            ready.dtype,
            ready.stats.kv_blocks_total,
            ready.engine.vision_tiles_per_step,
        )
        serve(conn, engine)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("the frontend went away; exiting")  # killed or crashed: nothing to report to


def serve(conn: Connection, engine: Engine) -> None:
    with torch.inference_mode():
        while True:
            cancelled = []
            block = not engine.has_work()
            while conn.poll(None if block else 0):
                block = False
                msg = conn.recv()
                if isinstance(msg, AddRequest):
                    try:
                        engine.add_request(msg.request)
                    except RequestRefused as exc:
                        conn.send(Rejected(msg.request.request_id, exc.limit, str(exc)))
                elif isinstance(msg, AbortRequest):
                    out = engine.abort(msg.request_id)
                    if out is not None:
                        cancelled.append(out)
                elif isinstance(msg, Shutdown):
                    return
            if not engine.has_work():
                if cancelled:
                    conn.send(StepReport(outputs=cancelled, stats=engine.stats(), image_decodes=decode_count()))
                continue
            start = time.perf_counter()
            result = engine.step()
            conn.send(
                StepReport(
                    outputs=cancelled + result.outputs,
                    stats=engine.stats(),
                    timings=result.timings,
                    seconds=time.perf_counter() - start,
                    image_decodes=decode_count(),
                )
            )
