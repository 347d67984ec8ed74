"""Continuous batching with chunked prefill, admission by free KV blocks and preemption by recompute.

Every step: running sequences first (single-token decodes before prefill chunks, oldest first), then
waiting ones while the token budget, the sequence limit and the free blocks allow. When the pool
runs dry, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later, so nobody fails for lack of memory that others hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_pool import BlockPool
from .kv_cache import blocks_needed
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes_known_tokens(self) -> bool:
        """After this chunk every known token is computed, so the step samples the next one."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    # Image embedding rows held at once across running sequences (computed per image when a chunk
    # first needs it, dropped once prefill has consumed it).
    max_image_embed_tokens: int = 1 << 30


class Scheduler:
    def __init__(self, pool: BlockPool, limits: SchedulerLimits) -> None:
        self.pool = pool
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.watermark_blocks = max(1, pool.num_blocks // 100)

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

    def _free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.reset_computation()

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
        """Start a sequence from the longest run of its full blocks that the prefix cache holds."""
        bs = self.limits.block_size
        long_rope = seq.wants_long_rope
        blocks = self.pool.cached_prefix(seq.full_block_hashes(seq.num_tokens, bs, long_rope))
        if len(blocks) * bs >= seq.num_tokens:
            blocks = blocks[:-1]  # the last token must run through the model for its logits
        if not blocks:
            return
        self.pool.take(blocks)
        seq.block_ids = blocks
        seq.num_registered_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * bs
        seq.kv_long_rope = long_rope

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly filled blocks to the prefix cache."""
        hashes = seq.full_block_hashes(seq.num_computed_tokens, self.limits.block_size, seq.kv_long_rope)
        for i in range(seq.num_registered_blocks, len(hashes)):
            self.pool.register(seq.block_ids[i], hashes[i])
        seq.num_registered_blocks = len(hashes)

    def _sync_long_rope(self, seq: Sequence) -> None:
        # Crossing the original context while decoding: recompute every key with the long factors.
        if seq.num_computed_tokens and seq.kv_long_rope != seq.wants_long_rope:
            self._free(seq)

    def _fit_image_budget(self, seq: Sequence, n: int, rows_left: int) -> tuple[int, int]:
        """Shorten a chunk so the images it would encode fit the embedding budget; (tokens, new rows)."""
        lo, hi = seq.num_computed_tokens, seq.num_computed_tokens + n
        added = 0
        for span in seq.image_spans:
            if span.end <= lo or span.start >= hi or span.index in seq.image_embeds:
                continue
            if added + span.length > rows_left:
                return max(0, span.start - lo), added  # stop before the image that does not fit
            added += span.length
        return n, added

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.limits.max_num_batched_tokens
        image_rows_left = self.limits.max_image_embed_tokens - sum(
            rows.shape[0] for seq in self.running for rows in seq.image_embeds.values()
        )
        scheduled: list[ScheduledChunk] = []
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.num_remaining > 1):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            self._sync_long_rope(seq)
            n, rows = self._fit_image_budget(seq, min(seq.num_remaining, budget), image_rows_left)
            if n <= 0:
                continue
            while not self._grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                for i, chunk in enumerate(scheduled):
                    if chunk.seq is victim:
                        budget += scheduled.pop(i).num_tokens
                        break
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(ScheduledChunk(seq, n))
                budget -= n
                image_rows_left -= rows

        # After a preemption the pool is short: admitting others now would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            self._take_cached_prefix(seq)
            n, rows = self._fit_image_budget(seq, min(seq.num_remaining, budget), image_rows_left)
            # Keep a few blocks for the running sequences to grow into, or a newcomer would be
            # admitted only to be preempted (and its images re-encoded) a step later.
            reserve = self.watermark_blocks if self.running else 0
            if n <= 0 or not self._grow(seq, n, reserve):
                # Give the cached prefix back until the sequence can run (its hashes stay valid).
                self.pool.free(seq.block_ids)
                seq.block_ids = []
                seq.num_computed_tokens = seq.num_registered_blocks = 0
                break
            if seq.first_scheduled_time is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.mark_scheduled()
            self.running.append(seq)
            scheduled.append(ScheduledChunk(seq, n))
            budget -= n
            image_rows_left -= rows
        return scheduled
