"""Prefix caching: full KV blocks are reused by later requests with the same prefix, exactly."""

from __future__ import annotations

import time

import pytest
import torch
from engine_helpers import image
from harness import TINY_MODEL, image_bytes

from service.engine import Engine, EngineConfig, EngineRequest, SamplingOptions
from service.engine.block_pool import BlockPool
from service.model import select_attention_backend
from service.processor.prompt import ChatMessage, PromptBuilder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(TINY_MODEL)


def engine(model, kv_bytes: int = 32 << 20) -> Engine:  # type: ignore[no-untyped-def]
    return Engine(model, EngineConfig(max_model_len=8192, kv_cache_memory_bytes=kv_bytes), select_attention_backend("auto", torch.device("cpu")))


def request(builder: PromptBuilder, rid: str, question: str, name: str | None = "A_640x480") -> EngineRequest:
    images = ()
    counts: list[int] = []
    if name:
        images = (image(image_bytes(name), 4),)
        counts = [images[0].num_tokens]
    msgs = [ChatMessage("system", "You are a careful assistant."), ChatMessage("user", question, (0,) if name else ())]
    ids = tuple(builder.encode(msgs, counts))
    return EngineRequest(rid, ids, images, SamplingOptions(max_new_tokens=12), time.time())


def run_one(eng: Engine, req: EngineRequest) -> tuple[list[int], int]:
    eng.add_request(req)
    ids: list[int] = []
    cached = -1
    while eng.has_work():
        for out in eng.step().outputs:
            ids += [t.token_id for t in out.tokens]
            if out.queue_seconds is not None:
                cached = out.num_cached_tokens
    return ids, cached


def test_shared_image_prefix_is_reused_and_tokens_are_exact(model, builder) -> None:  # type: ignore[no-untyped-def]
    first = request(builder, "a", "<|image_1|>\nDescribe this image.")
    second = request(builder, "b", "<|image_1|>\nWhat colours dominate?")
    fresh_ids, fresh_cached = run_one(engine(model), second)
    assert fresh_cached == 0

    eng = engine(model)
    run_one(eng, first)
    ids, cached = run_one(eng, second)
    assert ids == fresh_ids
    # Everything up to the block holding the first differing token comes from the cache.
    common = next(i for i, (x, y) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if x != y)
    assert cached == common // 16 * 16 and cached > 757
    stats = eng.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_cached_blocks > 0


def test_identical_prompt_reuses_all_but_the_last_token(model, builder) -> None:  # type: ignore[no-untyped-def]
    eng = engine(model)
    req = request(builder, "a", "Write a haiku about the sea.", name=None)
    ids1, cached1 = run_one(eng, req)
    ids2, cached2 = run_one(eng, EngineRequest("b", req.prompt_ids, (), req.sampling, time.time()))
    assert ids1 == ids2 and cached1 == 0
    assert cached2 == (len(req.prompt_ids) - 1) // 16 * 16


def test_another_image_of_the_same_size_is_not_a_hit(model, builder) -> None:  # type: ignore[no-untyped-def]
    eng = engine(model)
    run_one(eng, request(builder, "a", "<|image_1|>\nDescribe this image."))
    # Same text and token count, other pixels: only the text before the image may be shared.
    other = request(builder, "b", "<|image_1|>\nDescribe this image.")
    flipped = EngineRequest("b", other.prompt_ids, (image(_mirror(image_bytes("A_640x480")), 4),), other.sampling, time.time())
    _, cached = run_one(eng, flipped)
    first_image_pos = other.prompt_ids.index(-1)
    assert cached <= first_image_pos


def _mirror(png: bytes) -> bytes:
    import io

    from PIL import Image, ImageOps

    out = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(png))).save(out, format="PNG")
    return out.getvalue()


def test_block_pool_evicts_least_recently_freed_and_keeps_refcounts() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    pool.free(a)
    assert pool.num_free == 4 and pool.cached_prefix([b"h0", b"h1"]) == a
    pool.take(a[:1])
    assert pool.num_free == 3
    # The two never-used blocks go first, then the tail of the freed sequence (h1), never the held head.
    got = pool.allocate(3)
    assert a[0] not in got and a[1] in got
    assert pool.cached_prefix([b"h0", b"h1"]) == a[:1]
    pool.free(got + a[:1])
    assert pool.num_free == 4


def test_image_embedding_budget_holds_back_chunks_and_refuses_what_never_fits(model, builder) -> None:  # type: ignore[no-untyped-def]
    from service.engine import RequestRefused

    # Budget of one image (757 rows): two requests with an image each must take turns encoding,
    # and their tokens stay those of running alone.
    eng = Engine(
        model,
        EngineConfig(max_model_len=8192, kv_cache_memory_bytes=32 << 20, max_image_embed_tokens=800, max_num_batched_tokens=256),
        select_attention_backend("auto", torch.device("cpu")),
    )
    a = request(builder, "a", "<|image_1|>\nDescribe this image.")
    b = request(builder, "b", "<|image_1|>\nDescribe this image, please.", name="C_200x900")
    alone = {r.request_id: run_one(engine(model), r)[0] for r in (a, b)}
    eng.add_request(a)
    eng.add_request(b)
    got: dict[str, list[int]] = {"a": [], "b": []}
    while eng.has_work():
        assert eng.encoder_cache.used_rows <= 800
        for out in eng.step().outputs:
            got[out.request_id] += [t.token_id for t in out.tokens]
    assert got == alone
    big = request(builder, "c", "<|image_1|>\nAnd this one?", name="B_1024x300")
    small_budget = Engine(
        model, EngineConfig(max_model_len=8192, kv_cache_memory_bytes=8 << 20, max_image_embed_tokens=500), select_attention_backend("auto", torch.device("cpu"))
    )
    with pytest.raises(RequestRefused, match="image-embedding budget"):
        small_budget.add_request(big)
