"""The worker process: one device, one model copy, one engine, driven over a pipe.

The loop blocks on the pipe only while the engine is idle; while requests run it drains incoming
messages between steps, so new requests join the running batch at the next step.
"""

from __future__ import annotations

import io
import logging
import os
import time
from multiprocessing.connection import Connection

import torch
from PIL import Image

from ..engine import Engine, EngineConfig, EngineRequest, ImagePayload, RequestRefused, SamplingOptions
from ..engine.kv_cache import KVCacheSpec, blocks_needed
from ..model import Phi3VForCausalLM, load_model, resolve_dtype, select_attention_backend
from ..model.attention import AttentionBackend
from ..logs import configure_logging
from ..processor.image import num_image_tokens
from .protocol import (
    AbortRequest,
    AddRequest,
    Rejected,
    Shutdown,
    StepMetrics,
    StepReport,
    WorkerReady,
    WorkerSettings,
)

log = logging.getLogger("visionchat.worker")


def _warmup_request(
    eos_token_id: int, capacity_tokens: int, image_budget: int, side: int = 64, num_crops: int = 1, text_tokens: int = 8
) -> EngineRequest:
    """A text+image request that runs every kernel (decoder, vision tower, sampler) once, shrunk to
    whatever the worker's limits allow (the image is left out if it cannot fit)."""
    template = 8  # <s><|user|>\n ... \n<|end|>\n<|assistant|> and the 2 generated tokens
    n = num_image_tokens(side, side * 3 // 4, num_crops)
    if n > image_budget or n + 1 + template >= capacity_tokens:
        n = 0
    text_tokens = max(1, min(text_tokens, capacity_tokens - template - n - 1))
    images: tuple[ImagePayload, ...] = ()
    if n:
        buf = io.BytesIO()
        Image.new("RGB", (side, side * 3 // 4), (120, 30, 200)).save(buf, format="PNG")
        images = (ImagePayload(buf.getvalue(), num_crops, n),)
    image_part = (*([-1] * n), 1) if n else ()
    prompt = (1, 32010, *image_part, *([29871] * text_tokens), 13, 32007, 29871, 13, 32001)
    return EngineRequest(
        request_id="__warmup__",
        prompt_ids=prompt,
        images=images,
        sampling=SamplingOptions(max_new_tokens=2, eos_token_ids=frozenset({eos_token_id})),
        arrival_time=time.time(),
    )


def _kv_budget(settings: WorkerSettings, model: Phi3VForCausalLM, backend: AttentionBackend) -> int:
    """Bytes for the KV pool: --kv-cache-memory, or on accelerators --kv-cache-fraction of the device.

    With a fraction, a throwaway engine first runs one request at the largest step size (a full
    token budget and an image of 17 crops through the vision micro-batches); the pool then gets the
    fraction of total device memory less this process's peak during that profile (weights,
    activations, workspace), as vLLM's gpu_memory_utilization does."""
    device = model.device
    if settings.config.kv_cache_fraction <= 0 or device.type == "cpu":
        return settings.config.kv_cache_memory
    mem = torch.cuda if device.type == "cuda" else torch.npu  # type: ignore[attr-defined]
    probe = _warmup_request(
        model.config.eos_token_id,
        settings.max_model_len,
        settings.config.max_image_embed_tokens,
        side=4 * 336,
        num_crops=16,
        text_tokens=settings.config.max_num_batched_tokens,
    )
    spec = KVCacheSpec.for_model(model.config, settings.config.block_size, model.dtype)
    probe_blocks = blocks_needed(len(probe.prompt_ids) + 2, settings.config.block_size)
    mem.empty_cache()
    mem.reset_peak_memory_stats(device)
    Engine(model, _engine_config(settings, spec.bytes_per_block * probe_blocks), backend).run_to_completion([probe])
    peak = mem.max_memory_allocated(device)
    mem.empty_cache()
    _free, total = mem.mem_get_info(device)
    budget = int(total * settings.config.kv_cache_fraction) - peak
    if budget < spec.bytes_per_block:
        raise RuntimeError(
            f"--kv-cache-fraction {settings.config.kv_cache_fraction}: {total * settings.config.kv_cache_fraction / 2**30:.1f} GiB "
            f"of {device} leaves nothing for the KV cache after a peak of {peak / 2**30:.1f} GiB"
        )
    return budget


def _engine_config(settings: WorkerSettings, kv_bytes: int) -> EngineConfig:
    return EngineConfig(
        max_model_len=settings.max_model_len,
        kv_cache_memory_bytes=kv_bytes,
        block_size=settings.config.block_size,
        max_num_batched_tokens=settings.config.max_num_batched_tokens,
        max_num_seqs=settings.config.max_num_seqs,
        max_vision_crops=settings.config.max_vision_crops,
        max_image_embed_tokens=settings.config.max_image_embed_tokens,
    )


def worker_main(conn: Connection, settings: WorkerSettings) -> None:
    configure_logging(settings.config.log_format, settings.config.log_level)
    torch.set_num_threads(settings.num_threads)
    if settings.device.startswith("npu"):
        import torch_npu  # noqa: F401  (optional extra, imported only where it runs; registers the device)

    device = torch.device(settings.device)
    dtype = resolve_dtype(settings.config.dtype, device)
    # The shard progress bar is for people watching a terminal, not for JSON log pipelines.
    model, report = load_model(settings.model_dir, dtype, device, progress=settings.config.log_format == "text")
    backend = select_attention_backend(settings.config.attention_backend, device)
    engine = Engine(model, _engine_config(settings, _kv_budget(settings, model, backend)), backend)
    capacity = min(settings.max_model_len, engine.pool.num_blocks * settings.config.block_size)
    engine.run_to_completion([_warmup_request(model.config.eos_token_id, capacity, settings.config.max_image_embed_tokens)])
    conn.send(
        WorkerReady(
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention_backend=backend.name,
            stats=engine.stats(),
            load_seconds=report.seconds,
            pid=os.getpid(),
        )
    )
    log.info("ready on %s (%s, %d KV blocks)", device, dtype, engine.stats().kv_blocks_total)

    with torch.inference_mode():
        while True:
            aborted: list[str] = []
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
                        aborted.append(msg.request_id)
                        cancelled.append(out)
                elif isinstance(msg, Shutdown):
                    return
            if not engine.has_work():
                if aborted:
                    conn.send(StepReport(outputs=cancelled, stats=engine.stats(), aborted=aborted))
                continue
            start = time.perf_counter()
            outputs = engine.step()
            step = engine.last_step
            conn.send(
                StepReport(
                    outputs=cancelled + outputs,
                    stats=engine.stats(),
                    step=StepMetrics(
                        seconds=time.perf_counter() - start,
                        num_tokens=step.num_tokens,
                        num_prefill_tokens=step.num_tokens - step.num_decode_tokens,
                        num_decode_tokens=step.num_decode_tokens,
                        vision_seconds=step.vision_seconds,
                        num_images_encoded=step.num_images_encoded,
                    ),
                    aborted=aborted,
                )
            )
