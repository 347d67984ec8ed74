"""Paged attention: the one seam between the decoder and a device's attention kernel.

A step's tokens arrive flattened: first the decode tokens (one per sequence, batched into one kernel
call), then the prefill chunks (one call each). Keys and values are written into a paged cache
(`slot_mapping`) and read back through each sequence's block table, so a sequence's cache never has
to be contiguous and memory is handed out one block at a time.

Backends: `torch` is the portable path (scaled_dot_product_attention; CPU, CUDA, NPU). A faster kernel
(flash-attn's paged KV on CUDA, torch_npu's fused attention on Ascend) implements `AttentionBackend`
and registers in `BACKENDS` with an availability check; none is registered until it can be tested on
its hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's chunk inside the flattened batch."""

    start: int  # index of its first token in the flattened batch
    num_tokens: int  # tokens fed this step
    context_len: int  # tokens in its cache after this step (cached + fed)
    block_table: torch.Tensor  # (num_blocks,) int64: the blocks that hold [0, context_len)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: cache slot (block * block_size + offset) of every token
    num_decode_tokens: int  # tokens [0, num_decode_tokens) are single-token decodes
    decode_block_tables: torch.Tensor  # (num_decode, max_blocks) int64, padded with block 0
    decode_context_lens: torch.Tensor  # (num_decode,) int64
    decode_mask: torch.Tensor  # (num_decode, 1, 1, max_blocks * block_size) bool: True = attend
    prefills: list[PrefillSpan]


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # (T, heads, head_dim)
        k: torch.Tensor,  # (T, kv_heads, head_dim)
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, kv_heads, head_dim)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # (T, heads, head_dim)


class TorchPagedAttention:
    """Portable paged attention built on scaled_dot_product_attention."""

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        gqa = q.shape[1] != kv_heads

        nd = meta.num_decode_tokens
        if nd:
            tables = meta.decode_block_tables
            keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # (nd, kv_heads, S, D)
            values = v_cache[tables].flatten(1, 2).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
            )
            out[:nd] = o.squeeze(2)

        for span in meta.prefills:
            sl = slice(span.start, span.start + span.num_tokens)
            qs = q[sl].transpose(0, 1).unsqueeze(0)
            if span.context_len == span.num_tokens:
                # Whole sequence in this step: attend to the fresh keys, no cache gather.
                ks, vs = k[sl], v[sl]
                mask, causal = None, True
            else:
                ks = k_cache[span.block_table].flatten(0, 1)[: span.context_len]
                vs = v_cache[span.block_table].flatten(0, 1)[: span.context_len]
                offset = span.context_len - span.num_tokens
                rows = torch.arange(span.num_tokens, device=q.device)[:, None] + offset
                mask = torch.arange(span.context_len, device=q.device)[None, :] <= rows
                causal = False
            o = F.scaled_dot_product_attention(
                qs,
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=gqa,
            )
            out[sl] = o.squeeze(0).transpose(0, 1)
        return out


def _always(_device: torch.device) -> bool:
    return True


# name -> (is usable on this device, factory). Order is preference for "auto".
BACKENDS: dict[str, tuple[Callable[[torch.device], bool], Callable[[], AttentionBackend]]] = {
    "torch": (_always, TorchPagedAttention),
}


def select_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    if name == "auto":
        for available, factory in BACKENDS.values():
            if available(device):
                return factory()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    available, factory = BACKENDS[name]
    if not available(device):
        raise ValueError(f"attention backend {name!r} is not available on {device}")
    return factory()
