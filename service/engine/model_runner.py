"""Turns one scheduled step into model work: vision tiles, one flattened forward, sampling.

Reads sequences, never changes them: what it computed comes back as a `RunnerOutput` for the engine
to apply. Step inputs are built as plain Python lists and turned into one tensor per field, so the
cost of a step does not grow with per-sequence tensor allocations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..model import AttentionMetadata, Phi3VForCausalLM, PrefillSpan, StepInputs
from ..model.attention import AttentionBackend, DecodeGroup, decode_groups
from .errors import RequestFailed
from .kv_cache import KVCache
from .pixels import PixelsGone
from .request import TokenOutput
from .sampler import SamplingRow, sample
from .scheduler import EncodeWork, ScheduledChunk, SchedulerOutput
from .sequence import Sequence


@dataclass
class RunnerOutput:
    sampled: list[tuple[Sequence, TokenOutput]] = field(default_factory=list)
    tile_features: list[tuple[bytes, int, torch.Tensor]] = field(
        default_factory=list
    )  # (image key, first tile, features)
    completed_images: dict[bytes, torch.Tensor] = field(default_factory=dict)  # image key -> embedding rows
    num_tokens: int = 0
    num_decode_tokens: int = 0
    num_tiles: int = 0
    vision_seconds: float = 0.0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0


class ModelRunner:
    def __init__(
        self,
        model: Phi3VForCausalLM,
        kv_cache: KVCache,
        backend: AttentionBackend,
        max_vision_crops: int,
        upload: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        # Host tensors of step inputs -> the device (the platform's way: pinned and asynchronous on accelerators).
        self.upload = upload or (lambda t: t.to(model.device))
        self.kv_cache = kv_cache
        self.backend = backend
        self.max_vision_crops = max_vision_crops
        self.block_size = kv_cache.spec.block_size
        self.device = model.device

    # --- vision ----------------------------------------------------------------------------------

    def _read_tiles(self, work: EncodeWork) -> torch.Tensor:
        try:
            return work.image.pixels.read(work.tile_lo, work.tile_hi)
        except PixelsGone as exc:
            raise RequestFailed(work.request_id, f"the image's pixels are gone ({exc}); the request ended") from exc
        except (OSError, ValueError) as exc:
            raise RequestFailed(work.request_id, f"cannot read the image's pixels: {exc}") from exc

    def run_vision(
        self, encodes: list[EncodeWork], partial: Mapping[bytes, list[torch.Tensor]], out: RunnerOutput
    ) -> None:
        """Tile features for every work item, in micro-batches; images whose last tile is among them
        are laid out and projected into embedding rows."""
        if not encodes:
            return
        start = time.perf_counter()
        tiles = torch.cat([self._read_tiles(w) for w in encodes]).to(self.device)
        features = self.model.vision.crop_features(tiles, self.max_vision_crops)
        done_here: dict[bytes, list[torch.Tensor]] = {}
        for work, feats in zip(encodes, features.split([w.tile_hi - w.tile_lo for w in encodes]), strict=True):
            key = work.image.key
            done_here.setdefault(key, []).append(feats)
            if work.completes_image:
                all_tiles = torch.cat([*partial.get(key, []), *done_here.pop(key)])
                out.completed_images[key] = self.model.vision.embed_tiles(all_tiles, work.image.image_size)
            else:
                out.tile_features.append((key, work.tile_lo, feats))
        out.num_tiles = tiles.shape[0]
        out.vision_seconds = time.perf_counter() - start

    # --- the flattened step ----------------------------------------------------------------------

    def _decode_groups(self, tables: list[list[int]], lens: list[int]) -> list[DecodeGroup]:
        """Consecutive decode tokens (longest context first) whose padded, gathered keys fit the
        backend's workspace; a sequence that alone exceeds it is a group of its own."""
        spec = self.kv_cache.spec
        room = self.backend.decode_group_tokens(spec.num_kv_heads, spec.head_dim, spec.dtype)
        groups = []
        for start, count in decode_groups([len(t) * self.block_size for t in tables], room):
            rows, width = tables[start : start + count], len(tables[start])
            groups.append(
                DecodeGroup(
                    start=start,
                    count=count,
                    block_tables=self.upload(
                        torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.long)
                    ),
                    context_lens=self.upload(torch.tensor(lens[start : start + count], dtype=torch.long)),
                    max_len=lens[start],
                )
            )
        return groups

    def build_step(
        self, chunks: list[ScheduledChunk], embeds: Mapping[bytes, torch.Tensor]
    ) -> tuple[StepInputs, list[ScheduledChunk]]:
        """One forward's inputs: decode tokens first, longest context first (the attention backend
        groups them by what its workspace holds), then the prefill chunks. Returns the chunks in that
        order. `embeds` has every image the chunks cover."""
        bs = self.block_size
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: -len(c.seq.block_ids))
        prefills = [c for c in chunks if c.num_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        long_flags: list[bool] = []
        slots: list[int] = []
        logits_index: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        image_rows: list[torch.Tensor] = []
        image_index: list[int] = []

        def take_image_rows(seq: Sequence, lo: int, hi: int, flat: int) -> None:
            if lo >= seq.num_prompt_tokens:
                return
            for span in seq.image_spans:
                if span.start < hi and span.end > lo:
                    a, b = max(lo, span.start), min(hi, span.end)
                    image_rows.append(embeds[seq.request.images[span.index].key][a - span.start : b - span.start])
                    image_index.extend(range(flat + a - lo, flat + b - lo))

        for i, chunk in enumerate(decodes):  # one token each: a decode, or a one-token prefill chunk
            seq = chunk.seq
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            long_flags.append(seq.wants_long_rope)
            slots.append(seq.block_ids[pos // bs] * bs + pos % bs)
            decode_tables.append(seq.block_ids)
            decode_lens.append(pos + 1)
            take_image_rows(seq, pos, pos + 1, i)
            if chunk.completes_known_tokens:
                logits_index.append(i)

        spans: list[PrefillSpan] = []
        for chunk in prefills:
            seq, n = chunk.seq, chunk.num_tokens
            lo, hi = seq.num_computed_tokens, seq.num_computed_tokens + n
            flat = len(ids)
            ids.extend(seq.token_ids[lo:hi])
            positions.extend(range(lo, hi))
            long_flags.extend([seq.wants_long_rope] * n)
            table = seq.block_ids
            slots.extend([table[p // bs] * bs + p % bs for p in range(lo, hi)])
            take_image_rows(seq, lo, hi, flat)
            used = table[: -(-hi // bs)]
            spans.append(
                PrefillSpan(
                    start=flat,
                    num_tokens=n,
                    context_len=hi,
                    block_table=self.upload(torch.tensor(used, dtype=torch.long)),
                )
            )
            if chunk.completes_known_tokens:
                logits_index.append(len(ids) - 1)

        attention = AttentionMetadata(
            slot_mapping=self.upload(torch.tensor(slots, dtype=torch.long)),
            num_decode_tokens=len(decodes),
            decode_groups=self._decode_groups(decode_tables, decode_lens),
            prefills=spans,
        )
        step = StepInputs(
            input_ids=self.upload(torch.tensor(ids, dtype=torch.long)),
            positions=self.upload(torch.tensor(positions, dtype=torch.long)),
            use_long_rope=self.upload(torch.tensor(long_flags, dtype=torch.bool)),
            image_token_index=self.upload(torch.tensor(image_index, dtype=torch.long)),
            image_embeds=torch.cat(image_rows) if image_rows else None,
            attention=attention,
            logits_index=self.upload(torch.tensor(logits_index, dtype=torch.long)),
        )
        return step, decodes + prefills

    @torch.inference_mode()
    def execute(
        self,
        plan: SchedulerOutput,
        embeds: Mapping[bytes, torch.Tensor],
        partial: Mapping[bytes, list[torch.Tensor]],
    ) -> RunnerOutput:
        """Run one step: this step's vision work, then one forward over every chunk with tokens, then
        sampling for the chunks that complete their sequence's known tokens.

        `embeds`: complete image embeddings the chunks need (from the encoder cache); `partial`: tile
        features already computed for images this step completes."""
        out = RunnerOutput()
        self.run_vision(plan.encodes, partial, out)
        chunks = [c for c in plan.chunks if c.num_tokens > 0]
        if not chunks:
            return out
        start = time.perf_counter()
        step, ordered = self.build_step(chunks, {**embeds, **out.completed_images})
        out.num_tokens = step.input_ids.shape[0]
        out.num_decode_tokens = step.attention.num_decode_tokens
        logits = self.model(step, self.kv_cache.layers, self.backend)
        sampling = [c.seq for c in ordered if c.completes_known_tokens]
        out.forward_seconds = time.perf_counter() - start
        start = time.perf_counter()
        rows = [SamplingRow(s.request.sampling, s.token_ids, s.generator, s.matcher) for s in sampling]
        out.sampled = list(zip(sampling, sample(logits, rows), strict=True))
        out.sample_seconds = time.perf_counter() - start
        return out
