"""LongRoPE: short factors up to 4096 positions, long factors past it, decided per sequence.

The original picks the factor set per forward from its key length (> 4096: long, for every position)
and, when decoding crosses 4096, recomputes the whole cache once with the long factors: every
step's logits equal a fresh forward over the whole sequence (tests/fixtures/README.md 2.4). Here the
engine must give the same, however the prompt is chunked. Cheap on the tiny fixture model (fp32 CPU).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import prompt_forward

from service.engine import Engine, EngineConfig, EngineRequest, SamplingOptions
from service.engine.scheduler import Scheduler
from service.model import load_model_config
from service.model.rope import LongRoPE

CHECKPOINT = Path(__file__).parent / "fixtures" / "tiny-phi35v"
CPU = torch.device("cpu")
ORIGINAL_CONTEXT = 4096
ATTENTION_FACTOR = 1.1902380714  # sqrt(1 + ln(131072 / 4096) / ln(4096)), README 2.4
TOL = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(model, backend, chunk: int = 8192, max_len: int = 8192) -> Engine:
    per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    config = EngineConfig(
        max_model_len=max_len,
        kv_cache_memory_bytes=(max_len + 64) * per_token,
        block_size=16,
        max_num_batched_tokens=chunk,
    )
    return Engine(model, config, backend)


def text_ids(length: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 32000, (length - 1,), generator=gen).tolist()


def request(ids: list[int], max_new_tokens: int, request_id: str = "r") -> EngineRequest:
    return EngineRequest(request_id, tuple(ids), (), SamplingOptions(max_new_tokens=max_new_tokens), time.time())


def fresh_last_logits(engine: Engine, ids: list[int], force_short: bool = False) -> torch.Tensor:
    """Next-token logits of one fresh forward over the whole sequence `ids` (no cache reuse)."""
    logits, _ = prompt_forward(engine, request(ids, 1, "fresh"), force_short)
    return logits[-1]


# ---------------------------------------------------------------------------------------------------
# (c) the rotary tables


def test_rope_tables_and_attention_factor() -> None:
    config = load_model_config(CHECKPOINT)
    rope = LongRoPE(config)
    assert math.isclose(config.rope_attention_factor, ATTENTION_FACTOR, abs_tol=1e-10)
    assert math.isclose(rope.attention_factor, ATTENTION_FACTOR, abs_tol=1e-10)

    short, long = rope.inv_freq
    assert not torch.equal(short, long)
    j = torch.arange(48, dtype=torch.float64)
    base = 10000.0 ** (2 * j / 96)
    expected_short = 1 / (torch.tensor(config.rope_short_factor, dtype=torch.float64) * base)
    expected_long = 1 / (torch.tensor(config.rope_long_factor, dtype=torch.float64) * base)
    torch.testing.assert_close(short.double(), expected_short, rtol=1e-6, atol=0)
    torch.testing.assert_close(long.double(), expected_long, rtol=1e-6, atol=0)

    # Per-token choice: the same positions give different tables, each row its own flag.
    positions = torch.tensor([0, 5, 4095, 5000])
    cos_s, sin_s = rope.cos_sin(positions, torch.zeros(4, dtype=torch.bool), torch.float32)
    cos_l, sin_l = rope.cos_sin(positions, torch.ones(4, dtype=torch.bool), torch.float32)
    mixed_flags = torch.tensor([False, True, False, True])
    cos_m, sin_m = rope.cos_sin(positions, mixed_flags, torch.float32)
    assert not torch.allclose(cos_s[1:], cos_l[1:]) and not torch.allclose(sin_s[1:], sin_l[1:])
    torch.testing.assert_close(cos_m, torch.where(mixed_flags[:, None], cos_l, cos_s), rtol=0, atol=0)
    torch.testing.assert_close(sin_m, torch.where(mixed_flags[:, None], sin_l, sin_s), rtol=0, atol=0)
    # cos and sin are both scaled, short and long alike: at position 0, cos = factor and sin = 0.
    torch.testing.assert_close(cos_s[0], torch.full((96,), ATTENTION_FACTOR), rtol=1e-7, atol=0)
    torch.testing.assert_close(cos_l[0], torch.full((96,), ATTENTION_FACTOR), rtol=1e-7, atol=0)
    assert sin_s[0].abs().max() == 0 and sin_l[0].abs().max() == 0
    assert cos_l.abs().max() <= ATTENTION_FACTOR + 1e-6


def test_rope_matches_transformers_longrope() -> None:
    """Same inverse frequencies and attention factor as transformers' own LongRoPE code."""
    try:
        from transformers import Phi3Config
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = load_model_config(CHECKPOINT)
        hf = Phi3Config(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=config.max_position_embeddings,
            original_max_position_embeddings=config.original_max_position_embeddings,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": config.rope_theta,
                "short_factor": list(config.rope_short_factor),
                "long_factor": list(config.rope_long_factor),
            },
        )
        init = ROPE_INIT_FUNCTIONS["longrope"]
        hf_short, factor = init(hf, CPU, seq_len=ORIGINAL_CONTEXT)
        hf_long, _ = init(hf, CPU, seq_len=ORIGINAL_CONTEXT + 1)
    except (ImportError, TypeError, KeyError) as exc:  # transformers moved its rope helpers
        pytest.skip(f"transformers longrope API not available: {exc}")
    rope = LongRoPE(config)
    assert math.isclose(factor, rope.attention_factor, rel_tol=1e-12)
    assert torch.equal(rope.inv_freq[0], hf_short)
    assert torch.equal(rope.inv_freq[1], hf_long)


# ---------------------------------------------------------------------------------------------------
# (a) decoding across 4096 tokens


PROMPT_LEN = 4090
NEW_TOKENS = 10  # the sequence grows to 4100 tokens
CHECKED_LENGTHS = range(4093, 4100)  # forwards over 4093..4099 tokens: the last short ones and the first long ones


def _run_capturing(
    engine: Engine, ids: list[int], max_new_tokens: int
) -> tuple[list[int], dict[int, torch.Tensor], list[tuple[int, bool, int]]]:
    """Greedy-decode one request step by step through `engine.step`. Returns its tokens, the logits
    of each sampling step keyed by the length of the sequence they were computed over, and per step
    (length before the step, kv_long_rope after it, tokens computed in it)."""
    captured: dict[int, torch.Tensor] = {}
    model = engine.model
    engine.add_request(request(ids, max_new_tokens))
    seq = engine.sequences["r"]

    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        # One request: the step's only logits row, if any, is its next-token distribution.
        logits = type(model).forward(model, *args, **kwargs)
        if logits.shape[0]:
            captured[seq.num_tokens] = logits[0].cpu().clone()
        return logits

    model.forward = forward  # type: ignore[method-assign]
    tokens: list[int] = []
    trace: list[tuple[int, bool, int]] = []
    try:
        with torch.inference_mode():
            while engine.has_work():
                length = seq.num_tokens
                result = engine.step()
                for out in result.outputs:
                    tokens += [t.token_id for t in out.tokens]
                trace.append((length, seq.kv_long_rope, result.timings.num_tokens))
    finally:
        del model.forward
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    return tokens, captured, trace


def test_decoding_across_4096_equals_fresh_forward(model, backend) -> None:
    ids = text_ids(PROMPT_LEN)
    engine = make_engine(model, backend)
    tokens, logits_at, trace = _run_capturing(engine, ids, NEW_TOKENS)
    assert len(tokens) == NEW_TOKENS

    # The step that first sees 4097 tokens recomputes all of them with the long factors; the steps
    # before it decode one token with short-factor keys, the steps after one token with long ones.
    by_length = {length: (long, n) for length, long, n in trace}
    assert by_length[PROMPT_LEN] == (False, PROMPT_LEN)
    for length in range(PROMPT_LEN + 1, ORIGINAL_CONTEXT + 1):
        assert by_length[length] == (False, 1), length
    assert by_length[ORIGINAL_CONTEXT + 1] == (True, ORIGINAL_CONTEXT + 1)
    for length in range(ORIGINAL_CONTEXT + 2, PROMPT_LEN + NEW_TOKENS):
        assert by_length[length] == (True, 1), length

    sequence = ids + tokens
    reference = make_engine(model, backend)
    worst = 0.0
    for length in CHECKED_LENGTHS:
        fresh = fresh_last_logits(reference, sequence[:length])
        diff = (logits_at[length] - fresh).abs().max().item()
        worst = max(worst, diff)
        assert diff <= TOL, f"length {length}: engine vs fresh forward logits differ by {diff}"
        # The engine's token is the fresh forward's argmax (the next element of `sequence`).
        assert int(fresh.argmax()) == sequence[length], length
    print(f"\nmax |engine - fresh forward| logits around 4096: {worst:.3g}")

    # The check has teeth: past 4096 the short factors give clearly different logits.
    stale = fresh_last_logits(reference, sequence[: ORIGINAL_CONTEXT + 1], force_short=True)
    assert (stale - logits_at[ORIGINAL_CONTEXT + 1]).abs().max().item() > 100 * TOL


def test_without_recompute_the_logits_diverge(model, backend, monkeypatch) -> None:
    """Keeping the short-factor cache after the crossing (no recompute) is detectably wrong."""
    ids = text_ids(PROMPT_LEN)
    monkeypatch.setattr(Scheduler, "_sync_long_rope", lambda self, seq: None)
    engine = make_engine(model, backend)
    tokens, logits_at, _ = _run_capturing(engine, ids, NEW_TOKENS)
    fresh = fresh_last_logits(make_engine(model, backend), (ids + tokens)[: ORIGINAL_CONTEXT + 1])
    diff = (logits_at[ORIGINAL_CONTEXT + 1] - fresh).abs().max().item()
    print(f"\nwithout the recompute at 4097 tokens the logits move by {diff:.3g}")
    assert diff > 100 * TOL


# ---------------------------------------------------------------------------------------------------
# (b) a prompt longer than 4096 tokens, chunked


def test_long_prompt_chunked_equals_unchunked(model, backend) -> None:
    ids = text_ids(4200, seed=1)
    whole_tokens, whole_logits, whole_trace = _run_capturing(make_engine(model, backend), ids, 2)
    # 1000-token chunks: the first ones alone hold < 4096 keys, yet must use the long factors.
    chunk_tokens, chunk_logits, chunk_trace = _run_capturing(make_engine(model, backend, chunk=1000), ids, 2)
    assert [n for _, _, n in whole_trace] == [4200, 1]
    assert [n for _, _, n in chunk_trace] == [1000, 1000, 1000, 1000, 200, 1]
    assert all(long for _, long, _ in chunk_trace)

    diff = (whole_logits[4200] - chunk_logits[4200]).abs().max().item()
    print(f"\nmax |chunked - unchunked| first-token logits, 4200-token prompt: {diff:.3g}")
    assert diff <= TOL
    assert whole_tokens == chunk_tokens
    # Long factors for every position, the first chunks included: a fresh forward agrees, a
    # short-factor forward does not.
    reference = make_engine(model, backend)
    assert (fresh_last_logits(reference, ids) - chunk_logits[4200]).abs().max().item() <= TOL
    short = fresh_last_logits(reference, ids, force_short=True)
    assert (short - chunk_logits[4200]).abs().max().item() > 100 * TOL
