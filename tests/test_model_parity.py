"""Model parity with the original Phi-3.5-vision implementation (golden outputs of the tiny fixture).

fp32 on CPU, tolerances from tests/fixtures/README.md section 4.1. Beyond the one-shot forward, the
same greedy tokens must come out however the engine runs a request: prefill chunked into pieces of
1 to 500 tokens, blocks of 16 or 1 token, batched with other requests, preempted and recomputed.
Observed max differences are printed (run with -s) and attached to the test report as properties.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import image, prompt_forward

from service.engine import Engine, EngineConfig, EngineRequest, ImageInput, SamplingOptions
from service.engine.kv_cache import blocks_needed
from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence
from service.model.attention import TorchPagedAttention

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
CHECKPOINT = FIXTURES / "tiny-phi35v"
INDEX = json.loads((GOLDEN / "index.json").read_text())
CASES = list(INDEX["model"])  # text_only, nc4_one_A_640x480, nc4_one_B_1024x300, nc4_one_C_200x900, ...

TOL = 1e-3  # README 4.1 for logits, hidden state and image features
CPU = torch.device("cpu")
MAX_LEN = 4096
NEW_TOKENS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class GoldenCase:
    name: str
    prompt_ids: tuple[int, ...]
    images: tuple[ImageInput, ...]
    gen_tokens: list[int]
    golden: dict[str, np.ndarray]

    def request(self, request_id: str | None = None, sampling: SamplingOptions | None = None) -> EngineRequest:
        return EngineRequest(
            request_id=request_id or self.name,
            prompt_ids=self.prompt_ids,
            images=self.images,
            sampling=sampling or SamplingOptions(max_new_tokens=NEW_TOKENS),
            arrival_time=time.time(),
        )


def _load_case(name: str) -> GoldenCase:
    meta = INDEX["model"][name]
    with np.load(GOLDEN / f"model_{name}.npz") as z:
        golden = {k: z[k] for k in z.files}
    ids = tuple(int(t) for t in golden["input_ids"][0])
    images = []
    for k, name_ in enumerate(meta.get("images") or []):
        count = sum(1 for t in ids if t == -(k + 1))
        images.append(image((GOLDEN / "images" / f"{name_}.png").read_bytes(), meta["num_crops"]))
        assert images[-1].num_tokens == count
    return GoldenCase(name, ids, tuple(images), golden["gen_tokens"].tolist(), golden)


@pytest.fixture(scope="module")
def cases() -> dict[str, GoldenCase]:
    return {name: _load_case(name) for name in CASES}


@pytest.fixture(scope="module")
def observed() -> Iterator[dict[str, float]]:
    """Max differences seen across the module, printed at the end."""
    seen: dict[str, float] = {}
    yield seen
    print("\nobserved max |diff| vs golden (fp32 CPU):")
    for key in sorted(seen):
        print(f"  {key:45s} {seen[key]:.3g}")


def make_engine(
    model,
    backend,
    *,
    block_size: int = 16,
    chunk: int = 2048,
    num_blocks: int | None = None,
    max_num_seqs: int = 64,
) -> Engine:
    per_block = 2 * model.config.num_layers * block_size * model.config.num_kv_heads * model.config.head_dim * 4
    if num_blocks is None:
        num_blocks = blocks_needed(2 * MAX_LEN, block_size)
    config = EngineConfig(
        max_model_len=MAX_LEN,
        kv_cache_memory_bytes=num_blocks * per_block,
        block_size=block_size,
        max_num_batched_tokens=chunk,
        max_num_seqs=max_num_seqs,
        max_vision_crops=16,
    )
    engine = Engine(model, config, backend)
    assert engine.pool.num_blocks == num_blocks
    return engine


def run(engine: Engine, requests: list[EngineRequest]) -> dict[str, list[int]]:
    out = engine.run_to_completion(requests)
    stats = engine.stats()
    # Every block comes back once the requests are done, preempted or not.
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.num_running == 0 and stats.num_waiting == 0
    return out


# ---------------------------------------------------------------------------------------------------
# One-shot forward and greedy generation, every golden case


@pytest.mark.parametrize("name", CASES)
def test_forward_and_greedy_match_golden(name, cases, model, backend, observed, record_property) -> None:
    case = cases[name]
    engine = make_engine(model, backend)
    logits, hidden = prompt_forward(engine, case.request())
    g = case.golden

    d_logits = (logits[-1] - torch.from_numpy(g["last_logits"])).abs().max().item()
    d_hidden = (hidden[-1] - torch.from_numpy(g["last_hidden"])).abs().max().item()
    d_lse = (logits.logsumexp(-1) - torch.from_numpy(g["pos_logsumexp"])).abs().max().item()
    observed[f"{name}.last_logits"] = d_logits
    observed[f"{name}.last_hidden"] = d_hidden
    observed[f"{name}.pos_logsumexp"] = d_lse
    record_property("max_diff_last_logits", d_logits)
    record_property("max_diff_last_hidden", d_hidden)
    assert d_logits <= TOL, f"last_logits max diff {d_logits}"
    assert d_hidden <= TOL, f"last_hidden max diff {d_hidden}"

    # Argmax at every position: exact, except where our own top-2 logits are within the error.
    top2 = logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    ours = logits.argmax(-1)
    golden_argmax = torch.from_numpy(g["pos_argmax"])
    same = ours == golden_argmax
    observed[f"{name}.pos_argmax_mismatches"] = float((~same).sum().item())
    assert same.float().mean().item() >= 0.99
    clear = margin > TOL
    bad = torch.nonzero(clear & ~same).flatten().tolist()
    assert not bad, f"pos_argmax differs at positions {bad[:10]} with margins {margin[bad[:10]].tolist()}"

    tokens = run(engine, [case.request()])[name]
    assert tokens == case.gen_tokens


@torch.inference_mode()
def test_vision_features_match_golden(model, observed) -> None:
    name = "nc4_one_A_640x480"
    with np.load(GOLDEN / f"model_{name}.npz") as z:
        clip_golden, proj_golden = z["clip_features"], z["image_features_proj"]
    with np.load(GOLDEN / "processor_nc4.npz") as z:
        pixel_values = torch.from_numpy(z["A_640x480.pixel_values"][0])
        image_size = tuple(int(x) for x in z["A_640x480.image_sizes"][0])

    # Micro-batches of 2 crops: the split must not change the features.
    clip = model.vision.crop_features(pixel_values.to(model.device), 2).cpu()
    d_clip = (clip - torch.from_numpy(clip_golden)).abs().max().item()
    proj = model.vision([pixel_values.to(model.device)], [image_size], 16).cpu()
    d_proj = (proj - torch.from_numpy(proj_golden)).abs().max().item()
    observed[f"{name}.clip_features"] = d_clip
    observed[f"{name}.image_features_proj"] = d_proj
    assert clip.shape == clip_golden.shape and proj.shape == proj_golden.shape
    assert d_clip <= TOL, d_clip
    assert d_proj <= TOL, d_proj


# ---------------------------------------------------------------------------------------------------
# The engine's way of running a request must not change its tokens


@pytest.mark.parametrize(
    ("name", "chunk", "block_size"),
    [
        ("nc4_one_B_1024x300", 1, 16),  # the cheapest image case: 619 one-token prefill steps
        ("nc4_one_B_1024x300", 1, 1),
        ("nc4_one_A_640x480", 7, 16),
        ("nc4_one_A_640x480", 7, 1),
        ("nc4_one_C_200x900", 64, 16),
        ("nc4_one_C_200x900", 64, 1),
        ("nc4_two_A_B", 500, 16),  # chunk boundaries inside both images and between them
        ("nc4_two_A_B", 500, 1),
        ("nc16_one_A_640x480", 500, 16),
    ],
)
def test_chunked_prefill_gives_golden_tokens(name, chunk, block_size, cases, model, backend) -> None:
    case = cases[name]
    engine = make_engine(model, backend, block_size=block_size, chunk=chunk)
    assert run(engine, [case.request()])[name] == case.gen_tokens


def _text_request(request_id: str, length: int, sampling: SamplingOptions | None = None) -> EngineRequest:
    """A text prompt of `length` tokens (not a golden case: compared with itself run alone)."""
    gen = torch.Generator().manual_seed(length)
    ids = [1] + torch.randint(100, 32000, (length - 1,), generator=gen).tolist()
    return EngineRequest(
        request_id, tuple(ids), (), sampling or SamplingOptions(max_new_tokens=NEW_TOKENS), time.time()
    )


@pytest.fixture(scope="module")
def text_alone(model, backend) -> dict[int, list[int]]:
    """Greedy tokens of the extra text prompts, each run alone in a fresh engine."""
    out = {}
    for length in (40, 300):
        out[length] = run(make_engine(model, backend), [_text_request("t", length)])["t"]
    return out


@pytest.mark.parametrize("block_size", [16, 1])
def test_batched_requests_give_golden_tokens(block_size, cases, model, backend, text_alone) -> None:
    # All six golden cases and two text prompts in one engine; a 1024-token budget makes later
    # prompts prefill in chunks next to the earlier ones' decodes.
    engine = make_engine(model, backend, block_size=block_size, chunk=1024)
    requests = [cases[n].request() for n in CASES] + [_text_request(f"text{n}", n) for n in text_alone]
    out = run(engine, requests)
    for name in CASES:
        assert out[name] == cases[name].gen_tokens, name
    for n, tokens in text_alone.items():
        assert out[f"text{n}"] == tokens


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_preemption_recompute_gives_golden_tokens(phase, cases, model, backend, text_alone, monkeypatch) -> None:
    preempted: list[tuple[str, int]] = []  # (request id, output tokens it had) at each preemption
    original = Scheduler._preempt

    def spy(self: Scheduler, seq: Sequence) -> None:
        preempted.append((seq.request_id, seq.num_output_tokens))
        original(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    if phase == "prefill":
        # Room for the largest request and a little more. Small chunks let a second prompt start
        # while the first still grows, so the pool runs dry mid-prefill.
        names = ["nc4_one_A_640x480", "nc4_one_B_1024x300", "nc4_one_C_200x900", "text_only"]
        block_size, chunk = 16, 64
        requests = [cases[n].request() for n in names] + [_text_request("text300", 300)]
        longest = max(len(r.prompt_ids) for r in requests) + NEW_TOKENS
        num_blocks = blocks_needed(longest, block_size) + 4
    else:
        # One-token blocks: every decode step needs a block per sequence, so sequences that all
        # finished prefill run the pool dry while decoding and the newest is recomputed with its
        # generated tokens.
        names = ["nc4_one_B_1024x300", "text_only"]
        block_size, chunk = 1, 2048
        requests = [cases[n].request() for n in names] + [_text_request("text300", 300)]
        num_blocks = sum(len(r.prompt_ids) for r in requests) + 12
    engine = make_engine(model, backend, block_size=block_size, chunk=chunk, num_blocks=num_blocks)
    out = run(engine, requests)
    print(f"\npreemptions ({phase}): {preempted}")
    assert engine.scheduler.num_preemptions == len(preempted) > 0
    if phase == "decode":
        assert any(n_out > 0 for _, n_out in preempted)
    for name in names:
        assert out[name] == cases[name].gen_tokens, name
    assert out["text300"] == text_alone[300]


def test_seeded_sampling_is_reproducible(cases, model, backend) -> None:
    def sampling(seed: int) -> SamplingOptions:
        return SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, top_k=200, seed=seed)

    alone = run(make_engine(model, backend), [_text_request("s", 40, sampling(7))])["s"]
    again = run(make_engine(model, backend), [_text_request("s", 40, sampling(7))])["s"]
    assert alone == again

    # Batched with greedy and other sampled requests (one of them unseeded), chunked prefill.
    others = [
        cases["nc4_one_B_1024x300"].request(),
        _text_request("u", 300, SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.7)),
        _text_request("v", 41, sampling(8)),
    ]
    batched = run(make_engine(model, backend, chunk=256), others + [_text_request("s", 40, sampling(7))])
    assert batched["s"] == alone
    assert batched["nc4_one_B_1024x300"] == cases["nc4_one_B_1024x300"].gen_tokens

    different = run(make_engine(model, backend), [_text_request("s", 40, sampling(8))])["s"]
    assert different != alone


def test_a_tiny_attention_workspace_gives_golden_tokens(cases, model, text_alone) -> None:
    # 64 KiB holds 42 tokens of keys and values of the fixture model: every decode group is a handful of
    # sequences, most contexts are attended in chunks of keys merged by log-sum-exp, and every chunked
    # prefill step's cached context too. The tokens must not change.
    backend = TorchPagedAttention(workspace_bytes=64 << 10)
    engine = make_engine(model, backend, chunk=300)
    assert backend.decode_group_tokens(2, 96, torch.float32) == 42
    requests = [cases[n].request() for n in CASES] + [_text_request(f"text{n}", n) for n in text_alone]
    out = run(engine, requests)
    for name in CASES:
        assert out[name] == cases[name].gen_tokens, name
    for n, tokens in text_alone.items():
        assert out[f"text{n}"] == tokens
    assert backend._workspace is not None and backend._workspace.numel() * 4 <= 64 << 10


def test_chunked_attention_equals_one_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, head_dim, block_size, blocks = 4, 32, 16, 40
    cache = torch.randn(2, heads, blocks, block_size, head_dim, generator=gen)
    table = torch.randperm(blocks, generator=gen)[:30]
    context = 30 * block_size - 5
    q = torch.randn(heads, 7, head_dim, generator=gen)  # the last 7 positions of the context
    keys = cache[0][:, table].flatten(1, 2)[:, :context]
    values = cache[1][:, table].flatten(1, 2)[:, :context]
    rows = torch.arange(context - 7, context)[:, None]
    mask = torch.arange(context)[None, :] <= rows
    reference = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.2)
    for workspace in (4 << 10, 64 << 10, 1 << 20):
        chunked = TorchPagedAttention(workspace_bytes=workspace)._attend_in_chunks(q, cache, table, context, 0.2)
        torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
