"""Continuous batching with chunked prefill, bounded vision work, admission by free KV blocks and
preemption by recompute.

Every step: running sequences first (single-token decodes before prefill chunks, oldest first), then
waiting ones while the token budget, the sequence limit and the free blocks allow. When the pool
runs dry, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later (taking back whatever prefix the cache still holds), so
nobody fails for lack of memory that others hold.

Images: a prefill chunk may cover an image's positions only once its embedding is complete. The
tiles still to encode are planned in the order prefill needs them, at most `vision_tiles_per_step`
per step, so a burst of image requests gives first tokens one after another while decoding streams
keep stepping. A chunk stops before an image that is not complete after this step's vision work, or
that the encoder cache cannot hold yet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_pool import BlockPool
from .encoder_cache import EncoderCache
from .kv_cache import blocks_needed
from .request import ImageInput
from .sequence import Sequence, SequenceStatus

RUNNING_CAP_RELAX_STEPS = 64


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes_known_tokens(self) -> bool:
        """After this chunk every known token is computed, so the step samples the next one."""
        return self.num_tokens > 0 and self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class EncodeWork:
    """Tiles [tile_lo, tile_hi) of one image to run through the vision tower this step."""

    request_id: str  # the sequence that asked for it (a failure to read the pixels is its failure)
    image: ImageInput
    tile_lo: int
    tile_hi: int

    @property
    def completes_image(self) -> bool:
        return self.tile_hi == self.image.num_tiles


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # num_tokens may be 0: vision work only
    encodes: list[EncodeWork] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.encodes) or self.num_tokens > 0


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    vision_tiles_per_step: int = 1 << 30


class Scheduler:
    def __init__(self, pool: BlockPool, encoder_cache: EncoderCache, limits: SchedulerLimits) -> None:
        self.pool = pool
        self.encoder_cache = encoder_cache
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.watermark_blocks = max(1, pool.num_blocks // 100)
        # Set after the device ran out of memory mid-step: no more running sequences than then, lifted
        # by one every RUNNING_CAP_RELAX_STEPS steps that run, so the batch probes its way back up.
        self.running_cap: int | None = None
        self._steps_under_cap = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and free all its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.FINISHED

    # --- memory ----------------------------------------------------------------------------------

    def _unpin(self, seq: Sequence, indices: list[int] | set[int]) -> None:
        for index in list(indices):
            self.encoder_cache.release(seq.request.images[index].key)
            seq.pinned_images.discard(index)

    def _free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.reset_computation()
        self._unpin(seq, seq.pinned_images)

    def shrink_for_memory(self) -> None:
        """The device ran out of memory in a step: preempt the newest sequence and run no more at once
        until steps succeed again."""
        self._preempt(self.running[-1])
        self.running_cap = max(1, len(self.running))
        self._steps_under_cap = 0

    def step_ran(self) -> None:
        if self.running_cap is not None:
            self._steps_under_cap += 1
            if self._steps_under_cap >= RUNNING_CAP_RELAX_STEPS:
                self.running_cap += 1
                self._steps_under_cap = 0
                if self.running_cap >= self.limits.max_num_seqs:
                    self.running_cap = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        need = blocks_needed(seq.num_computed_tokens + num_tokens, self.limits.block_size) - len(seq.block_ids)
        if need + reserve > self.pool.num_free:
            return False
        if need > 0:
            seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start a sequence (new, preempted or restarted for LongRoPE) from the longest run of its
        full blocks that the prefix cache still holds."""
        bs = self.limits.block_size
        long_rope = seq.wants_long_rope
        blocks = self.pool.cached_prefix(seq.full_block_hashes(seq.num_tokens, bs, long_rope))
        if len(blocks) * bs >= seq.num_tokens:
            blocks = blocks[:-1]  # the last token must run through the model for its logits
        seq.kv_long_rope = long_rope
        if not blocks:
            return
        self.pool.take(blocks)
        seq.block_ids = blocks
        seq.num_registered_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * bs

    def _give_back_prefix(self, seq: Sequence) -> None:
        """Undo `_take_cached_prefix` for a sequence that cannot start yet (its hashes stay valid)."""
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = seq.num_registered_blocks = 0
        self._unpin(seq, seq.pinned_images)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly filled blocks to the prefix cache."""
        hashes = seq.full_block_hashes(seq.num_computed_tokens, self.limits.block_size, seq.kv_long_rope)
        for i in range(seq.num_registered_blocks, len(hashes)):
            self.pool.register(seq.block_ids[i], hashes[i])
        seq.num_registered_blocks = len(hashes)

    def release_consumed_images(self, seq: Sequence) -> None:
        self._unpin(seq, seq.consumed_images())

    def _sync_long_rope(self, seq: Sequence) -> None:
        # Crossing the original context while decoding: every key must be recomputed with the long
        # factors. Blocks computed so with the same content may still be cached (another sequence,
        # or this one before a preemption), so this goes through the prefix cache like a new start.
        if seq.num_computed_tokens and seq.kv_long_rope != seq.wants_long_rope:
            self._free(seq)
            self._take_cached_prefix(seq)
            seq.num_cached_tokens += seq.num_computed_tokens

    # --- planning --------------------------------------------------------------------------------

    def _plan_chunk(
        self, seq: Sequence, max_tokens: int, tiles_left: int, planned: dict[bytes, int]
    ) -> tuple[int, list[EncodeWork]]:
        """How many of `max_tokens` next tokens the sequence can compute this step, and the vision work
        that makes it possible. Pins the images it plans for (the caller unpins on failure)."""
        lo = seq.num_computed_tokens
        hi = lo + min(seq.num_remaining, max_tokens)
        work: list[EncodeWork] = []
        cache = self.encoder_cache
        for span in seq.image_spans:
            if span.end <= lo or span.start >= hi:
                continue
            image = seq.request.images[span.index]
            if span.index not in seq.pinned_images:
                if not cache.acquire(image.key, span.length, image.num_tiles):
                    return span.start - lo, work  # the cache is full of images others still need
                seq.pinned_images.add(span.index)
            if cache.is_complete(image.key):
                continue
            done = max(cache.tiles_done(image.key), planned.get(image.key, 0))
            take = min(image.num_tiles - done, tiles_left)
            if take > 0:
                work.append(EncodeWork(seq.request_id, image, done, done + take))
                planned[image.key] = done + take
                tiles_left -= take
            if done + take < image.num_tiles:
                return span.start - lo, work  # the rest of its tiles come in later steps
        return hi - lo, work

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.limits.max_num_batched_tokens
        tiles_left = self.limits.vision_tiles_per_step
        planned: dict[bytes, int] = {}  # image key -> tiles encoded once this step's work is done
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.num_remaining > 1):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            self._sync_long_rope(seq)
            n, work = self._plan_chunk(seq, budget, tiles_left, planned)
            if n <= 0 and not work:
                continue
            # Planned vision work runs even if its sequence is preempted below: others may have
            # planned on top of it, and its result stays in the encoder cache for the recompute.
            out.encodes += work
            tiles_left -= sum(w.tile_hi - w.tile_lo for w in work)
            while not self._grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                for i, chunk in enumerate(out.chunks):
                    if chunk.seq is victim:
                        budget += out.chunks.pop(i).num_tokens
                        break
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.chunks.append(ScheduledChunk(seq, n))
                budget -= n

        # After a preemption the pool is short: admitting others now would only thrash.
        max_running = min(self.limits.max_num_seqs, self.running_cap or self.limits.max_num_seqs)
        while not preempted and self.waiting and budget > 0 and len(self.running) < max_running:
            seq = self.waiting[0]
            self._take_cached_prefix(seq)
            n, work = self._plan_chunk(seq, budget, tiles_left, planned)
            # Keep a few blocks for the running sequences to grow into, or a newcomer would be
            # admitted only to be preempted (and its images re-encoded) a step later.
            reserve = self.watermark_blocks if self.running else 0
            if (n <= 0 and not work) or not self._grow(seq, n, reserve):
                self._give_back_prefix(seq)
                break
            seq.num_cached_tokens += seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.mark_scheduled()
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            out.encodes += work
            budget -= n
            tiles_left -= sum(w.tile_hi - w.tile_lo for w in work)
        return out
