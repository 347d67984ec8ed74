"""Serving benchmark: N concurrent streaming clients against one-at-a-time, in the same run.

Starts a real server, then for each model configuration measures
  * one request at a time (the baseline),
  * N concurrent streaming clients for each N in --streams,
reporting output tokens/s, TTFT and inter-token latency p50/p99, and CPU seconds per output token
summed over every server process (frontend + workers; steadier than wall-clock on a shared machine),
plus throughput ratios against the baseline. With --heavy it adds a compute-heavy configuration
(real Phi-3.5 decoder widths, few layers, small CLIP) and compares the engine's served decode rate
with the raw batched forward rate of the same model measured in-process.

    make bench                      # tiny fixture model + compute-heavy configuration
    python bench/serving.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import psutil
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from harness import TINY_MODEL, ServerProcess  # noqa: E402  (the tests' real-server launcher)
from service.devices import cpu_threads_per_worker  # noqa: E402

PROMPTS = [
    "Write a haiku about the sea.",
    "Describe a quiet morning in a small mountain village, with the light and the sounds.",
    "List three reasons to learn a second language.",
    "Explain how a bicycle stays upright while moving.",
]


@dataclass
class PhaseResult:
    name: str
    streams: int
    requests: int
    output_tokens: int
    wall_seconds: float
    tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    cpu_ms_per_token: float
    step_ms: float  # mean engine step in the worker
    forward_ms: float  # mean model forward + sampling of a step
    step_overhead_ms: float  # step - forward: scheduling, input building, bookkeeping, IPC send


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def histogram_sums(metrics_url: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram, over every worker."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {n: [0.0, 0.0] for n in names}
    for line in text.splitlines():
        for n in names:
            if line.startswith(n + "_sum"):
                out[n][0] += float(line.rsplit(" ", 1)[1])
            elif line.startswith(n + "_count"):
                out[n][1] += float(line.rsplit(" ", 1)[1])
    return {n: (v[0], v[1]) for n, v in out.items()}


STEP_HISTOGRAMS = ("visionchat_engine_step_seconds", "visionchat_model_forward_seconds")


def server_cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def one_request(stub: pb_grpc.VisionChatServiceStub, prompt: str, max_new_tokens: int) -> tuple[float, list[float], int]:
    req = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, text=prompt)],
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    first = None
    last = None
    gaps: list[float] = []
    tokens = 0
    async for r in stub.Generate(req, timeout=600):
        if r.HasField("delta") and r.delta.tokens:
            now = time.perf_counter()
            if first is None:
                first = now - start
            elif last is not None:
                gaps.append(now - last)
            last = now
            tokens += len(r.delta.tokens)
    assert first is not None and tokens == max_new_tokens, (tokens, max_new_tokens)
    return first, gaps, tokens


async def run_phase(address: str, pid: int, metrics_url: str, name: str, streams: int, per_stream: int, max_new_tokens: int) -> PhaseResult:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VisionChatServiceStub(channel)
        await one_request(stub, PROMPTS[0], 4)  # connection and caches warm
        ttfts: list[float] = []
        gaps: list[float] = []
        tokens = 0

        async def client(i: int) -> None:
            nonlocal tokens
            for j in range(per_stream):
                first, g, n = await one_request(stub, PROMPTS[(i + j) % len(PROMPTS)], max_new_tokens)
                ttfts.append(first)
                gaps.extend(g)
                tokens += n

        steps0 = histogram_sums(metrics_url, STEP_HISTOGRAMS)
        cpu0 = server_cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(streams)))
        wall = time.perf_counter() - t0
        cpu = server_cpu_seconds(pid) - cpu0
        steps1 = histogram_sums(metrics_url, STEP_HISTOGRAMS)
    step_s, step_n = (steps1[STEP_HISTOGRAMS[0]][i] - steps0[STEP_HISTOGRAMS[0]][i] for i in (0, 1))
    fwd_s, fwd_n = (steps1[STEP_HISTOGRAMS[1]][i] - steps0[STEP_HISTOGRAMS[1]][i] for i in (0, 1))
    step_ms = 1000 * step_s / step_n if step_n else float("nan")
    forward_ms = 1000 * fwd_s / fwd_n if fwd_n else float("nan")
    return PhaseResult(
        name=name,
        streams=streams,
        requests=streams * per_stream,
        output_tokens=tokens,
        wall_seconds=round(wall, 3),
        tokens_per_second=round(tokens / wall, 1),
        ttft_p50_ms=round(1000 * percentile(ttfts, 0.5), 2),
        ttft_p99_ms=round(1000 * percentile(ttfts, 0.99), 2),
        itl_p50_ms=round(1000 * percentile(gaps, 0.5), 2),
        itl_p99_ms=round(1000 * percentile(gaps, 0.99), 2),
        cpu_ms_per_token=round(1000 * cpu / tokens, 3),
        step_ms=round(step_ms, 3),
        forward_ms=round(forward_ms, 3),
        step_overhead_ms=round(step_ms - forward_ms, 3),
    )


def heavy_model_dir(cache: Path, layers: int) -> Path:
    """Real Phi-3.5 decoder widths (3072 hidden, 8192 MLP, 32 heads), `layers` layers, the small CLIP."""
    from service.checkpoint_writer import write_random_checkpoint

    out = cache / f"heavy-{layers}l"
    if (out / "config.json").exists():
        return out
    config = json.loads((TINY_MODEL / "config.json").read_text())
    config.update(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=layers)
    config["_name_or_path"] = f"phi35v-widths-{layers}-layers-random"
    tmp = out.with_suffix(".tmp")
    write_random_checkpoint(tmp, config, seed=1, max_shard_bytes=2 << 30)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "preprocessor_config.json"):
        (tmp / name).write_bytes((TINY_MODEL / name).read_bytes())
    tmp.rename(out)
    return out


def raw_forward_rate(model_dir: Path, batch: int, context: int, steps: int, threads: int) -> float:
    """Decode tokens/s of bare batched forward passes (no scheduler, sampler, IPC or gRPC)."""
    import torch

    from service.engine import Engine, EngineConfig
    from service.engine.scheduler import ScheduledChunk, SchedulerOutput
    from service.engine.sequence import Sequence
    from service.engine.request import EngineRequest, SamplingOptions
    from service.model import load_model
    from service.platform import platform_for

    # The server's own platform set-up (thread policy, measured GEMM paths), so the two rates compare.
    platform = platform_for("cpu")
    platform.configure_process(threads)
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"), progress=False)
    platform.prepare_model(model, {"decoder": min(batch, 16), "lm_head": min(batch, 16), "vision": 577, "projector": 1024}, "auto")
    engine = Engine(model, EngineConfig(max_model_len=4096, kv_cache_memory_bytes=1 << 30), platform.attention_backend("auto", 256 << 20))
    seqs = []
    for i in range(batch):
        req = EngineRequest(f"r{i}", tuple([1] + [100 + i] * (context - 1)), (), SamplingOptions(max_new_tokens=steps + 1), time.time())
        seq = Sequence(req, 4096)
        seq.block_ids = engine.pool.allocate(-(-(context + steps) // 16))
        seq.num_computed_tokens = context - 1  # pretend the prompt is cached: time pure decode steps
        seqs.append(seq)
    with torch.inference_mode():
        plan = SchedulerOutput(chunks=[ScheduledChunk(s, 1) for s in seqs])
        engine.runner.execute(plan, {}, {})
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.runner.execute(plan, {}, {})
        wall = time.perf_counter() - t0
    return batch * steps / wall


def run_model(label: str, model_dir: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, object]:
    server = ServerProcess(["--model", str(model_dir), "--kv-cache-memory", args.kv_cache_memory, *args.server_args.split(), *extra]).start(timeout=600)
    assert server.proc is not None
    try:
        metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        results = [asdict(asyncio.run(run_phase(server.address, server.proc.pid, metrics_url, "one-at-a-time", 1, args.baseline_requests, args.max_new_tokens)))]
        for n in args.streams:
            results.append(asdict(asyncio.run(run_phase(server.address, server.proc.pid, metrics_url, f"{n} concurrent", n, args.requests_per_stream, args.max_new_tokens))))
    finally:
        server.stop()
    base = results[0]["tokens_per_second"]
    for r in results:
        r["throughput_vs_one_at_a_time"] = round(r["tokens_per_second"] / base, 2)  # type: ignore[operator]
    return {"model": label, "phases": results}


def print_table(report: dict[str, object]) -> None:
    print(f"\n== {report['model']} ==")
    cols = ["name", "requests", "tokens_per_second", "throughput_vs_one_at_a_time", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "cpu_ms_per_token", "step_ms", "forward_ms", "step_overhead_ms"]
    print(" | ".join(cols))
    for r in report["phases"]:  # type: ignore[union-attr]
        print(" | ".join(str(r[c]) for c in cols))
    if "raw_forward_tokens_per_second" in report:
        print(f"raw batched forward: {report['raw_forward_tokens_per_second']} tok/s; engine/raw = {report['engine_vs_raw']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--server-args", default="", help="extra server flags, e.g. '--cpu-threads 1'")
    parser.add_argument("--configs", default="tiny,heavy", help="which of tiny, heavy to run")
    parser.add_argument("--heavy-layers", type=int, default=2)
    parser.add_argument("--heavy-streams", type=lambda s: [int(x) for x in s.split(",")], default=[16])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/visionchat-bench"))
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args()

    configs = args.configs.split(",")
    reports = []
    if "tiny" in configs:
        reports.append(run_model("tiny fixture checkpoint (tests/fixtures/tiny-phi35v)", TINY_MODEL, args, []))
        print_table(reports[-1])
    if "heavy" in configs:
        model_dir = heavy_model_dir(args.cache, args.heavy_layers)
        heavy_args = argparse.Namespace(**{**vars(args), "streams": args.heavy_streams, "kv_cache_memory": "1GiB"})
        report = run_model(f"compute-heavy: Phi-3.5 widths, {args.heavy_layers} layers, small CLIP", model_dir, heavy_args, [])
        batch = args.heavy_streams[-1]
        # Same torch thread count as the server's CPU worker, so the two rates are comparable.
        threads = cpu_threads_per_worker(["cpu"])[0]
        raw = raw_forward_rate(model_dir, batch, context=24, steps=16, threads=threads)
        served = report["phases"][-1]["tokens_per_second"]  # type: ignore[index]
        report["raw_forward_tokens_per_second"] = round(raw, 1)
        report["engine_vs_raw"] = round(served / raw, 3)
        reports.append(report)
        print_table(report)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
