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
from PIL import Image

from ..engine import Engine, EngineRequest, RequestRefused, SamplingOptions
from ..engine.kv_cache import KVCacheSpec, blocks_needed
from ..engine.pixels import TensorPixels
from ..engine.request import ImageInput
from ..engine.sequence import image_content_key
from ..logs import configure_logging
from ..model import Phi3VForCausalLM, load_model
from ..model.attention import AttentionBackend
from ..platform import Platform, platform_for
from ..processor.image import decode_count, preprocess_image
from .protocol import AbortRequest, AddRequest, Rejected, Shutdown, StepReport, WorkerReady, WorkerSettings

log = logging.getLogger("visionchat.worker")

# Rows each linear role sees in service, for measuring the GEMM paths: a decode batch, a few vision
# tiles of 577 patches, the projector's rows for one image.
VISION_ROWS_PER_TILE = 577
PROJECTOR_ROWS = 1024


def _synthetic_image(side: int, num_crops: int) -> tuple[ImageInput, int]:
    """A generated image (no decoding), preprocessed in-process, and its token count."""
    image = Image.new("RGB", (side, side * 3 // 4), (120, 30, 200))
    processed = preprocess_image(image, num_crops)
    key = image_content_key(f"warmup-{side}-{num_crops}".encode(), num_crops)
    tiles = processed.pixel_values
    return ImageInput(
        key, processed.num_tokens, int(tiles.shape[0]), processed.image_size, TensorPixels(tiles)
    ), processed.num_tokens


def warmup_request(
    eos_token_id: int,
    capacity_tokens: int,
    image_budget: int,
    side: int = 64,
    num_crops: int = 1,
    text_tokens: int = 8,
    with_image: bool = True,
) -> EngineRequest:
    """A request that runs the decoder, the sampler and (with an image) the vision tower, shrunk to
    whatever the worker's limits allow (the image is left out if it cannot fit)."""
    template = 8  # <s><|user|>\n ... \n<|end|>\n<|assistant|> and the 2 generated tokens
    image, n = _synthetic_image(side, num_crops)
    if not with_image or n > image_budget or n + 1 + template >= capacity_tokens:
        n = 0
    text_tokens = max(1, min(text_tokens, capacity_tokens - template - n - 1))
    image_part = (*([-1] * n), 1) if n else ()
    prompt = (1, 32010, *image_part, *([29871] * text_tokens), 13, 32007, 29871, 13, 32001)
    return EngineRequest(
        request_id="__warmup__",
        prompt_ids=prompt,
        images=(image,) if n else (),
        sampling=SamplingOptions(max_new_tokens=2, eos_token_ids=frozenset({eos_token_id})),
        arrival_time=time.time(),
    )


def _kv_budget(settings: WorkerSettings, platform: Platform, model: Phi3VForCausalLM, backend: AttentionBackend) -> int:
    """Bytes for the KV pool: --kv-cache-memory, or on accelerators --kv-cache-fraction of the device.

    With a fraction, a throwaway engine first runs one request at the largest step size (a full
    token budget and an image of 17 crops through the vision micro-batches); the pool then gets the
    fraction of total device memory less this process's peak during that profile (weights,
    activations, workspace), as vLLM's gpu_memory_utilization does."""
    config = settings.engine
    memory = platform.memory_info()
    if settings.kv_cache_fraction <= 0 or memory is None:
        return config.kv_cache_memory_bytes
    mem = torch.cuda if model.device.type == "cuda" else torch.npu  # type: ignore[attr-defined]
    probe = warmup_request(
        model.config.eos_token_id,
        config.max_model_len,
        config.max_image_embed_tokens,
        side=4 * 336,
        num_crops=16,
        text_tokens=config.max_num_batched_tokens,
    )
    spec = KVCacheSpec.for_model(model.config, config.block_size, model.dtype)
    probe_blocks = blocks_needed(len(probe.prompt_ids) + 2, config.block_size)
    mem.empty_cache()
    mem.reset_peak_memory_stats(model.device)
    profile = dataclasses.replace(
        config, kv_cache_memory_bytes=spec.bytes_per_block * probe_blocks, vision_tiles_per_step=config.max_vision_crops
    )
    Engine(model, profile, backend).run_to_completion([probe])
    peak = mem.max_memory_allocated(model.device)
    mem.empty_cache()
    total = platform.memory_info().total_bytes  # type: ignore[union-attr]
    budget = int(total * settings.kv_cache_fraction) - peak
    if budget < spec.bytes_per_block:
        raise RuntimeError(
            f"--kv-cache-fraction {settings.kv_cache_fraction}: {total * settings.kv_cache_fraction / 2**30:.1f} GiB "
            f"of {model.device} leaves nothing for the KV cache after a peak of {peak / 2**30:.1f} GiB"
        )
    return budget


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
    config = dataclasses.replace(config, kv_cache_memory_bytes=_kv_budget(settings, platform, model, backend))
    engine = Engine(model, config, backend)
    capacity = min(config.max_model_len, engine.pool.num_blocks * config.block_size)
    text_only = warmup_request(model.config.eos_token_id, capacity, config.max_image_embed_tokens, with_image=False)
    platform.measured_tile_seconds(warm_up(engine, text_only, platform))
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
