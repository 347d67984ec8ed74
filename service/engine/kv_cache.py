"""The paged KV cache: one preallocated pool of fixed-size blocks per worker.

`KVCache` owns the tensors (`block_pool.BlockPool` hands out their block ids). Sizing happens
once at start-up from a byte budget, so a busy worker never allocates device memory per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.attention import AttentionBackend
from ..model.config import ModelConfig


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    """Per layer one tensor in the attention backend's layout (keys and values of every block)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device, backend: AttentionBackend) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = backend.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.layers = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
