"""The scheduler, block pool and encoder cache without a model: fake sequences, property-based.

A small driver plays the engine's part (advance what a step computed, release consumed images,
offer full blocks to the prefix cache, append a token where one is sampled) and checks after every
step what must always hold: no block is held by more sequences than its reference count says, free
blocks plus held blocks are the pool, the token and vision budgets are never exceeded, every running
sequence has the blocks its KV needs, the encoder cache stays within its rows, and every request
finishes with everything given back.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.block_pool import BlockPool
from service.engine.encoder_cache import EncoderCache
from service.engine.kv_cache import blocks_needed
from service.engine.pixels import TensorPixels
from service.engine.request import EngineRequest, ImageInput, SamplingOptions
from service.engine.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from service.engine.sequence import Sequence, SequenceStatus

LONG_ROPE_AT = 4096
NO_PIXELS = TensorPixels(torch.empty(0))


@dataclass(frozen=True)
class Spec:
    prompt_len: int
    new_tokens: int
    image: int | None  # which of a few shared images (None: text only)
    image_at: int  # prompt position of the image
    prefix: int  # which of a few shared prompt prefixes


def make_image(which: int) -> ImageInput:
    tokens = 40 + 24 * which
    return ImageInput(key=bytes([which]) * 16, num_tokens=tokens, num_tiles=1 + which, image_size=(336, 336), pixels=NO_PIXELS)


def make_request(i: int, spec: Spec) -> EngineRequest:
    shared = [1] + [100 + spec.prefix] * 40  # several requests start alike: prefix-cache hits
    ids = (shared + [1000 + (i * 7 + k) % 500 for k in range(spec.prompt_len)])[: max(spec.prompt_len, 2)]
    images: tuple[ImageInput, ...] = ()
    if spec.image is not None:
        image = make_image(spec.image)
        at = min(spec.image_at, len(ids))
        ids = ids[:at] + [-1] * image.num_tokens + ids[at:]
        images = (image,)
    return EngineRequest(f"r{i}", tuple(ids), images, SamplingOptions(max_new_tokens=spec.new_tokens), time.time())


class Driver:
    """The engine's bookkeeping around the scheduler, with a deterministic stand-in for the model."""

    def __init__(self, num_blocks: int, block_size: int, budget: int, max_seqs: int, tiles: int, rows: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.cache = EncoderCache(rows)
        self.limits = SchedulerLimits(budget, max_seqs, block_size, tiles)
        self.scheduler = Scheduler(self.pool, self.cache, self.limits)
        self.live: dict[str, Sequence] = {}
        self.finished: dict[str, list[int]] = {}
        self.steps = 0
        self.preempted_while_generating = 0

    def add(self, request: EngineRequest) -> None:
        seq = Sequence(request, LONG_ROPE_AT)
        self.live[request.request_id] = seq
        self.scheduler.add(seq)

    def step(self) -> SchedulerOutput:
        before = {s.request_id: s.num_output_tokens for s in self.scheduler.running}
        plan = self.scheduler.schedule()
        self.steps += 1
        self.preempted_while_generating += sum(
            1 for s in self.scheduler.waiting if s.num_preemptions and before.get(s.request_id, 0) > 0
        )
        self.check(plan)
        for work in plan.encodes:
            key = work.image.key
            if work.completes_image:
                self.cache.complete(key, torch.zeros(work.image.num_tokens, 1))
            else:
                self.cache.add_tiles(key, work.tile_lo, torch.zeros(work.tile_hi - work.tile_lo, 1))
        for chunk in plan.chunks:
            seq = chunk.seq
            for span in seq.image_spans:  # a chunk only ever covers complete images
                if span.start < seq.num_computed_tokens + chunk.num_tokens and span.end > seq.num_computed_tokens:
                    assert self.cache.is_complete(seq.request.images[span.index].key)
            if chunk.num_tokens == 0:
                continue
            sample = chunk.completes_known_tokens
            seq.num_computed_tokens += chunk.num_tokens
            seq.kv_long_rope = seq.wants_long_rope
            self.scheduler.release_consumed_images(seq)
            self.scheduler.cache_full_blocks(seq)
            if sample:
                seq.token_ids.append(2000 + seq.num_tokens % 97)
                if seq.num_output_tokens >= seq.request.sampling.max_new_tokens:
                    self.scheduler.remove(seq)
                    self.finished[seq.request_id] = seq.output_ids
                    del self.live[seq.request_id]
        return plan

    def check(self, plan: SchedulerOutput) -> None:
        assert plan.num_tokens <= self.limits.max_num_batched_tokens
        assert sum(w.tile_hi - w.tile_lo for w in plan.encodes) <= self.limits.vision_tiles_per_step
        assert len(self.scheduler.running) <= self.limits.max_num_seqs
        held = Counter(b for s in self.live.values() for b in s.block_ids)
        refs = self.pool._refs  # the pool's own view must agree with who holds what
        for block in range(self.pool.num_blocks):
            assert refs[block] == held.get(block, 0), (block, refs[block], held.get(block, 0))
        assert self.pool.num_free + len(held) == self.pool.num_blocks
        for seq in self.scheduler.running:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_ids) >= blocks_needed(seq.num_computed_tokens, self.limits.block_size)
        for seq in self.scheduler.waiting:
            assert not seq.block_ids and not seq.pinned_images
        assert self.cache.used_rows <= self.cache.capacity_rows

    def run(self, max_steps: int) -> None:
        while self.scheduler.has_work():
            self.step()
            assert self.steps < max_steps, f"no progress: {len(self.live)} requests left after {self.steps} steps"
        assert self.pool.num_free == self.pool.num_blocks
        assert all(e.pins == 0 for e in self.cache._entries.values())


specs = st.builds(
    Spec,
    prompt_len=st.integers(2, 120),
    new_tokens=st.integers(1, 40),
    image=st.one_of(st.none(), st.integers(0, 2)),
    image_at=st.integers(1, 60),
    prefix=st.integers(0, 1),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(specs, min_size=1, max_size=12),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(8, 256),
    max_seqs=st.integers(1, 8),
    tiles=st.integers(1, 4),
    spare_blocks=st.integers(0, 40),
)
def test_invariants_hold_and_every_request_finishes(requests, block_size, budget, max_seqs, tiles, spare_blocks) -> None:  # type: ignore[no-untyped-def]
    reqs = [make_request(i, spec) for i, spec in enumerate(requests)]
    largest = max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in reqs)
    # Room for the largest request alone and a little more: others must wait or be preempted.
    driver = Driver(blocks_needed(largest, block_size) + spare_blocks, block_size, budget, max_seqs, tiles, rows=200)
    for r in reqs:
        driver.add(r)
    driver.run(max_steps=20_000)
    assert sorted(driver.finished) == sorted(r.request_id for r in reqs)
    for r in reqs:
        assert len(driver.finished[r.request_id]) == r.sampling.max_new_tokens


def test_generating_sequences_are_preempted_and_take_their_prefix_back() -> None:
    # One-token blocks and a pool that holds the prompts but not their growth: decoding runs it dry,
    # so sequences that already generated are preempted, and on readmission their still-cached head
    # blocks come back from the prefix cache (counted in num_cached_tokens).
    reqs = [make_request(i, Spec(prompt_len=60, new_tokens=30, image=None, image_at=0, prefix=i)) for i in range(3)]
    driver = Driver(num_blocks=3 * 60 + 20, block_size=1, budget=512, max_seqs=8, tiles=4, rows=200)
    seqs = []
    for r in reqs:
        driver.add(r)
        seqs.append(driver.live[r.request_id])
    driver.run(max_steps=5_000)
    assert driver.preempted_while_generating > 0
    preempted = [s for s in seqs if s.num_preemptions]
    assert preempted and any(s.num_cached_tokens > 0 for s in preempted)
    assert sorted(driver.finished) == ["r0", "r1", "r2"]


def test_vision_work_is_planned_in_prefill_order_within_the_tile_budget() -> None:
    # Three requests with different images of 3 tiles each, one tile per step: the first request's
    # image is encoded first, and no chunk covers an image before its last tile is in.
    reqs = [make_request(i, Spec(prompt_len=20, new_tokens=2, image=2, image_at=5, prefix=0)) for i in range(3)]
    reqs = [
        EngineRequest(r.request_id, r.prompt_ids, (ImageInput(bytes([i]) * 16, 88, 3, (336, 336), NO_PIXELS),), r.sampling, r.arrival_time)
        for i, r in enumerate(reqs)
    ]
    driver = Driver(num_blocks=400, block_size=16, budget=2048, max_seqs=8, tiles=1, rows=10_000)
    for r in reqs:
        driver.add(r)
    order = []
    while driver.scheduler.has_work():
        plan = driver.step()
        order += [w.request_id for w in plan.encodes]
    assert order == ["r0"] * 3 + ["r1"] * 3 + ["r2"] * 3


def test_the_same_image_in_two_requests_is_encoded_once() -> None:
    reqs = [make_request(i, Spec(prompt_len=30, new_tokens=3, image=1, image_at=3, prefix=i)) for i in range(2)]
    driver = Driver(num_blocks=400, block_size=16, budget=2048, max_seqs=8, tiles=8, rows=10_000)
    for r in reqs:
        driver.add(r)
    tiles = 0
    while driver.scheduler.has_work():
        tiles += sum(w.tile_hi - w.tile_lo for w in driver.step().encodes)
    assert tiles == make_image(1).num_tiles
    assert driver.cache.hits == 1 and driver.cache.misses == 1
