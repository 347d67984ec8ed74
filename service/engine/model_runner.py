"""Turns a list of scheduled chunks into one flattened model step and runs it.

Owns the model, the KV cache tensors and the attention backend. Image embeddings are computed here,
per image, the first time a chunk covers that image's positions (the vision tower runs in
micro-batches of `max_vision_crops` crops), and released once prefill has consumed them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model import AttentionMetadata, Phi3VForCausalLM, PrefillSpan, StepInputs
from ..model.attention import AttentionBackend
from ..processor.image import decode_image, preprocess_image
from .errors import RequestFailed
from .kv_cache import KVCache
from .scheduler import ScheduledChunk
from .sequence import Sequence

# The frontend already enforced the configured pixel limit; this only guards against a bug upstream.
_WORKER_MAX_PIXELS = 1 << 31


@dataclass
class StepStats:
    num_tokens: int = 0
    num_decode_tokens: int = 0
    vision_seconds: float = 0.0
    num_images_encoded: int = 0


class ModelRunner:
    def __init__(
        self,
        model: Phi3VForCausalLM,
        kv_cache: KVCache,
        backend: AttentionBackend,
        max_vision_crops: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.max_vision_crops = max_vision_crops
        self.block_size = kv_cache.spec.block_size
        self.device = model.device

    def _encode_images(self, seq: Sequence, indices: list[int], stats: StepStats) -> None:
        start = time.perf_counter()
        try:
            processed = [
                preprocess_image(decode_image(seq.request.images[i].data, _WORKER_MAX_PIXELS), seq.request.images[i].num_crops)
                for i in indices
            ]
        except ValueError as exc:
            raise RequestFailed(seq.request_id, f"image preprocessing failed: {exc}") from exc
        embeds = self.model.vision(
            [p.pixel_values.to(self.device) for p in processed],
            [p.image_size for p in processed],
            self.max_vision_crops,
        )
        for i, rows in zip(indices, embeds.split([p.num_tokens for p in processed])):
            seq.image_embeds[i] = rows
        stats.vision_seconds += time.perf_counter() - start
        stats.num_images_encoded += len(indices)

    def _image_rows(self, seq: Sequence, lo: int, hi: int, base: int, stats: StepStats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Embedding rows for image positions in [lo, hi) and their flat indices (base = flat index of lo)."""
        spans = [s for s in seq.image_spans if s.start < hi and s.end > lo]
        missing = [s.index for s in spans if s.index not in seq.image_embeds]
        if missing:
            self._encode_images(seq, missing, stats)
        rows, index = [], []
        for s in spans:
            a, b = max(lo, s.start), min(hi, s.end)
            rows.append(seq.image_embeds[s.index][a - s.start : b - s.start])
            index.append(torch.arange(base + a - lo, base + b - lo))
        return rows, index

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def build_step(self, chunks: list[ScheduledChunk], stats: StepStats) -> tuple[StepInputs, list[ScheduledChunk]]:
        # Single-token chunks first: the attention backend batches them as decodes.
        chunks = sorted(chunks, key=lambda c: c.num_tokens > 1)
        ids, positions, long_flags, slots = [], [], [], []
        image_rows: list[torch.Tensor] = []
        image_index: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        logits_index: list[int] = []
        decode_tables, decode_lens = [], []
        flat = 0
        for chunk in chunks:
            seq, n = chunk.seq, chunk.num_tokens
            lo, hi = seq.num_computed_tokens, seq.num_computed_tokens + n
            pos = torch.arange(lo, hi)
            table = torch.tensor(seq.block_ids, dtype=torch.long)
            ids.append(torch.tensor(seq.token_ids[lo:hi], dtype=torch.long))
            positions.append(pos)
            long_flags.append(torch.full((n,), seq.wants_long_rope, dtype=torch.bool))
            slots.append(self._slots(table, pos))
            if seq.image_spans and lo < seq.num_prompt_tokens:
                rows, index = self._image_rows(seq, lo, hi, flat, stats)
                image_rows += rows
                image_index += index
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(hi)
            else:
                used = table[: -(-hi // self.block_size)]
                prefills.append(PrefillSpan(start=flat, num_tokens=n, context_len=hi, block_table=used.to(self.device)))
            flat += n
            if chunk.completes_known_tokens:
                logits_index.append(flat - 1)
        stats.num_tokens = flat

        nd = len(decode_lens)
        stats.num_decode_tokens = nd
        max_blocks = max((len(t) for t in decode_tables), default=0)
        tables = torch.zeros((nd, max_blocks), dtype=torch.long)
        for i, t in enumerate(decode_tables):
            tables[i, : len(t)] = t
        lens = torch.tensor(decode_lens, dtype=torch.long)
        mask = torch.arange(max_blocks * self.block_size)[None, :] < lens[:, None]
        dev = self.device
        attention = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            num_decode_tokens=nd,
            decode_block_tables=tables.to(dev),
            decode_context_lens=lens.to(dev),
            decode_mask=mask[:, None, None, :].to(dev),
            prefills=prefills,
        )
        return StepInputs(
            input_ids=torch.cat(ids).to(dev),
            positions=torch.cat(positions).to(dev),
            use_long_rope=torch.cat(long_flags).to(dev),
            image_token_index=(torch.cat(image_index) if image_index else torch.empty(0, dtype=torch.long)).to(dev),
            image_embeds=torch.cat(image_rows) if image_rows else None,
            attention=attention,
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=dev),
        ), chunks

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor, StepStats]:
        """Run one step. Returns the chunks in the order of the returned logits' rows and step stats.

        Only chunks that complete their sequence's known tokens get a logits row."""
        stats = StepStats()
        step, ordered = self.build_step(chunks, stats)
        logits = self.model(step, self.kv_cache.layers, self.backend)
        for chunk in ordered:
            chunk.seq.kv_long_rope = chunk.seq.wants_long_rope
        sampling = [c for c in ordered if c.completes_known_tokens]
        return sampling, logits.cpu(), stats
