"""Isolation benchmark: a text stream's latency alone, then next to heavy but valid callers.

    make bench-isolation                       # embedded default model
    .venv/bin/python bench/isolation.py --model ~/.cache/visionchat-peers/ckpt-phi35v-l256   # full CLIP tower

A probe client sends short text requests one after another (64 tokens each) and records each one's
time to first token and the gaps between its tokens. It runs alone (the baseline), then while
  (a) two clients keep sending 8 MB text prompts (refused: far beyond the context),
  (b) 24 clients each send 4 flat 40-megapixel PNGs (inside every limit: decoded, shed where full),
  (c) 4 clients each send one full-size photo (3024x4032 JPEG, default num_crops).
Reported per phase: the probe's TTFT p50/p99, its longest gap between two tokens, ITL p50/p99, each as
a ratio to the baseline; and what the heavy callers got. Targets (issue 11): TTFT p99 <= 1 s and no
gap over 0.5 s in (a) and (b).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from harness import ServerProcess, generate_request  # noqa: E402

OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


@dataclass
class ProbeResult:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    max_gap: float = 0.0

    def row(self) -> dict[str, float]:
        return {
            "ttft_p50": percentile(self.ttft, 0.5),
            "ttft_p99": percentile(self.ttft, 0.99),
            "max_gap": self.max_gap,
            "itl_p50": percentile(self.itl, 0.5),
            "itl_p99": percentile(self.itl, 0.99),
        }


async def probe(stub: pb_grpc.VisionChatServiceStub, stop: asyncio.Event) -> ProbeResult:
    result = ProbeResult()
    i = 0
    while not stop.is_set():
        i += 1
        start = time.perf_counter()
        last = None
        async for msg in stub.Generate(generate_request(f"Probe {i}: write about the sea.", max_new_tokens=64, ignore_eos=True), timeout=300):
            if not msg.HasField("delta") or not msg.delta.tokens:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft.append(now - start)
            else:
                gap = now - last
                result.max_gap = max(result.max_gap, gap)
                result.itl.extend([gap / len(msg.delta.tokens)] * len(msg.delta.tokens))
            last = now
    return result


def flat_png(pixels: int, colour: tuple[int, int, int]) -> bytes:
    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def photo(width: int = 3024, height: int = 4032, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


async def heavy(stub: pb_grpc.VisionChatServiceStub, make, outcomes: Counter[str], repeat: bool, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    while True:
        try:
            async for _ in stub.Generate(make(), timeout=600):
                pass
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            outcomes[err.code().name] += 1
        if not repeat or stop.is_set():
            return


async def phase(address: str, seconds: float, heavy_clients: list) -> tuple[ProbeResult, Counter[str]]:  # type: ignore[type-arg]
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as probe_ch, grpc.aio.insecure_channel(address, options=OPTIONS) as heavy_ch:
        probe_stub = pb_grpc.VisionChatServiceStub(probe_ch)
        heavy_stub = pb_grpc.VisionChatServiceStub(heavy_ch)
        loads = [asyncio.create_task(heavy(heavy_stub, make, outcomes, repeat, stop)) for make, repeat in heavy_clients]
        await asyncio.sleep(0.5 if loads else 0)  # the heavy requests land first
        probing = asyncio.create_task(probe(probe_stub, stop))
        await asyncio.sleep(seconds)
        stop.set()
        result = await probing
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
    return result, outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model folder (default: the embedded default model)")
    parser.add_argument("--seconds", type=float, default=20.0, help="probe time per phase")
    parser.add_argument("--server-args", default="", help="extra server flags")
    args = parser.parse_args()
    server_args = (["--model", args.model] if args.model else []) + args.server_args.split()
    server = ServerProcess(server_args).start(timeout=600)
    text_8mb = "lorem ipsum dolor sit amet " * 310_000
    flood_images = [flat_png(39_900_000, (40 * k, 90, 200 - 40 * k)) for k in range(4)]
    photos = [photo(seed=k) for k in range(4)]
    phases = {
        "idle": [],
        "(a) 2 x 8 MB prompts": [(lambda: generate_request(text_8mb, max_new_tokens=16), True)] * 2,
        "(b) 24 x 4 x 40 MP PNG": [(lambda: generate_request("Compare these.", flood_images, max_new_tokens=16), False)] * 24,
        "(c) 4 full-size photos": [
            (lambda k=k: generate_request("Describe this photo.", [photos[k]], max_new_tokens=16), False) for k in range(4)
        ],
    }
    rows = {}
    try:
        for name, clients in phases.items():
            result, outcomes = asyncio.run(phase(server.address, args.seconds, clients))
            rows[name] = (result.row(), dict(outcomes), len(result.ttft))
            print(f"{name}: {rows[name]}", flush=True)
            server.wait_idle(600)
    finally:
        server.stop()

    base = rows["idle"][0]
    print("\n| phase | probe requests | TTFT p50 (ms) | TTFT p99 (ms) | longest gap (ms) | ITL p50 (ms) | ITL p99 (ms) | heavy callers got |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (row, outcomes, n) in rows.items():
        cells = []
        for key in ("ttft_p50", "ttft_p99", "max_gap", "itl_p50", "itl_p99"):
            ratio = "" if name == "idle" or not base[key] else f" ({row[key] / base[key]:.2f}x)"
            cells.append(f"{1e3 * row[key]:.1f}{ratio}")
        got = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "-"
        print(f"| {name} | {n} | " + " | ".join(cells) + f" | {got} |")
    worst = {k: v for k, v in rows.items() if k.startswith(("(a)", "(b)"))}
    ok = all(r["ttft_p99"] <= 1.0 and r["max_gap"] <= 0.5 for r, _, _ in worst.values())
    print(f"\ntarget (a), (b): TTFT p99 <= 1 s and no gap over 0.5 s: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
