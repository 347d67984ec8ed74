"""How many bytes a worker's KV pool gets.

--kv-cache-memory in bytes is taken as it is. With `auto`, a CPU worker takes 256 MiB; an accelerator
worker first runs the steps that set its memory peak (`probes.profile_requests`) in a throwaway
engine, with the attention workspace reserved whole, and the pool gets what is left of its share of
the device (--kv-cache-fraction split between the device's workers) after that peak, and no more
than the memory actually free now minus the peak's transient part and a margin (the runtime's
context, other processes on the device and fragmentation are only visible there).
"""

from __future__ import annotations

import dataclasses
import logging

from ..engine import Engine, EngineConfig
from ..engine.kv_cache import KVCacheSpec, blocks_needed
from ..model import Phi3VForCausalLM
from ..model.attention import AttentionBackend
from ..platform import Platform
from .probes import profile_requests

log = logging.getLogger("visionchat.worker")

CPU_DEFAULT_BYTES = 256 << 20
# Kept free on top of the measured peak: allocator fragmentation and whatever grows after the profile.
MARGIN_FRACTION = 0.02
MARGIN_MIN_BYTES = 256 << 20


def profile_peak(config: EngineConfig, model: Phi3VForCausalLM, backend: AttentionBackend, platform: Platform) -> int:
    """Peak device bytes (weights included, the probe's own KV pool excluded) of the biggest steps."""
    requests = profile_requests(config, model.config.eos_token_id)
    spec = KVCacheSpec.for_model(model.config, config.block_size, model.dtype)
    blocks = sum(blocks_needed(len(r.prompt_ids) + r.sampling.max_new_tokens, config.block_size) for r in requests)
    probe_pool = blocks * spec.bytes_per_block
    probe = dataclasses.replace(config, kv_cache_memory_bytes=probe_pool, vision_tiles_per_step=config.max_vision_crops)
    platform.empty_cache()
    platform.reset_peak()
    engine = Engine(model, probe, backend, platform)
    backend.reserve_workspace(engine.kv_cache.layers[0])
    engine.run_to_completion(requests)
    peak = platform.peak_bytes() - probe_pool
    del engine
    platform.empty_cache()
    return peak


def kv_budget(
    config: EngineConfig, share: float, model: Phi3VForCausalLM, backend: AttentionBackend, platform: Platform
) -> int:
    if config.kv_cache_memory_bytes > 0:
        return config.kv_cache_memory_bytes
    if platform.memory_info() is None:
        return CPU_DEFAULT_BYTES
    peak = profile_peak(config, model, backend, platform)
    memory = platform.memory_info()
    assert memory is not None
    margin = max(MARGIN_MIN_BYTES, int(memory.total_bytes * MARGIN_FRACTION))
    by_share = int(memory.total_bytes * share) - peak
    by_free = memory.free_bytes - max(0, peak - platform.allocated_bytes()) - margin
    budget = min(by_share, by_free)
    gib = 1 << 30
    log.info(
        "KV pool %.2f GiB: peak %.2f GiB, share %.0f%% of %.1f GiB, %.2f GiB free",
        max(budget, 0) / gib,
        peak / gib,
        100 * share,
        memory.total_bytes / gib,
        memory.free_bytes / gib,
    )
    spec = KVCacheSpec.for_model(model.config, config.block_size, model.dtype)
    if budget < spec.bytes_per_block * blocks_needed(config.max_num_batched_tokens, config.block_size):
        total, free = memory.total_bytes / gib, memory.free_bytes / gib
        raise ValueError(
            f"{platform.device}: no room for a KV pool: the worker's share ({share:.2f} of {total:.1f} GiB, "
            f"{free:.1f} GiB free) minus its peak of {peak / gib:.2f} GiB leaves {max(budget, 0) / gib:.2f} GiB "
            "(raise --kv-cache-fraction, lower --max-num-batched-tokens or --max-num-seqs, "
            "or run fewer workers per device)"
        )
    return budget
