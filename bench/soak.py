"""Soak benchmark: mixed clients against a real server for minutes; RSS of every process over time.

    make soak                                  # 30 minutes, 2 CPU workers, 8-16 clients
    SOAK_MINUTES=5 make soak                   # shorter
    .venv/bin/python bench/soak.py --help

Clients loop over text requests, image requests (one of a few images, so the caches see repeats),
streams cancelled midway and bad requests, with a concurrency that moves between --min-clients and
--max-clients. Every --sample seconds the RSS of the frontend, each worker and the preprocessing
processes is recorded. The report gives each process's RSS after warm-up, its slope (least squares,
MiB per minute) and that slope per request: a process that keeps something per request shows a
slope that grows with the request count; a flat one levels off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from harness import TINY_MODEL, ServerProcess, generate_request, image_bytes  # noqa: E402

IMAGES = ["A_640x480", "B_1024x300", "C_200x900"]
WORDS = "the sea is calm tonight and the moon lies fair upon the straits on the french coast".split()


@dataclass
class Counts:
    ok: int = 0
    cancelled: int = 0
    refused: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.ok + self.cancelled + self.refused + sum(self.errors.values())


def roles(server_pid: int) -> dict[str, list[psutil.Process]]:
    """The server's processes by role: frontend, workers, preprocessing (with its forkserver)."""
    frontend = psutil.Process(server_pid)
    out: dict[str, list[psutil.Process]] = {"frontend": [frontend], "workers": [], "preprocess": []}
    for child in frontend.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd:
            out["workers"].append(child)
        elif "resource_tracker" not in cmd:  # the forkserver and the pool processes forked from it
            out["preprocess"].append(child)
    return out


def rss_mib(server_pid: int) -> dict[str, float]:
    sample: dict[str, float] = {}
    for role, procs in roles(server_pid).items():
        for i, p in enumerate(sorted(procs, key=lambda p: p.pid)):
            try:
                sample[role if role == "frontend" else f"{role}{i}"] = p.memory_info().rss / 2**20
            except psutil.Error:
                pass
    return sample


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


async def client(stub: pb_grpc.VisionChatServiceStub, counts: Counts, stop: asyncio.Event, active: asyncio.Semaphore, rng: random.Random) -> None:
    while not stop.is_set():
        async with active:
            kind = rng.random()
            text = " ".join(rng.sample(WORDS, rng.randint(3, 12)))
            images = [image_bytes(rng.choice(IMAGES))] if 0.7 <= kind < 0.9 else []
            req = generate_request(text, images, num_crops=rng.choice([1, 4]) if images else None, max_new_tokens=rng.randint(4, 48))
            if kind >= 0.97:
                req.sampling.temperature = -1.0  # a bad request: INVALID_ARGUMENT
            cancel_after = rng.randint(1, 4) if 0.9 <= kind < 0.97 else None
            try:
                call = stub.Generate(req, timeout=120)
                seen = 0
                async for msg in call:
                    if msg.HasField("delta"):
                        seen += 1
                        if cancel_after is not None and seen >= cancel_after:
                            call.cancel()
                            counts.cancelled += 1
                            break
                else:
                    counts.ok += 1
            except asyncio.CancelledError:
                counts.cancelled += 1
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.CANCELLED:
                    counts.cancelled += 1
                elif err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    counts.refused += 1
                else:
                    counts.errors[err.code().name] = counts.errors.get(err.code().name, 0) + 1


async def drive(server: ServerProcess, args: argparse.Namespace) -> tuple[list[dict[str, float]], Counts]:
    counts = Counts()
    stop = asyncio.Event()
    rng = random.Random(args.seed)
    active = asyncio.Semaphore(args.max_clients)
    samples: list[dict[str, float]] = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.VisionChatServiceStub(channel)
        tasks = [asyncio.create_task(client(stub, counts, stop, active, random.Random(rng.random()))) for _ in range(args.max_clients)]
        start = time.monotonic()
        end = start + args.minutes * 60
        held: list[object] = []
        while time.monotonic() < end:
            # Move the concurrency between min and max clients by holding some semaphore slots.
            target = rng.randint(args.min_clients, args.max_clients)
            while len(held) < args.max_clients - target:
                await active.acquire()
                held.append(object())
            while len(held) > args.max_clients - target:
                held.pop()
                active.release()
            await asyncio.sleep(args.sample)
            sample = {"t_min": (time.monotonic() - start) / 60, "requests": counts.total, **rss_mib(server.proc.pid)}  # type: ignore[union-attr]
            samples.append(sample)
            print(json.dumps({k: round(v, 2) for k, v in sample.items()}), flush=True)
        stop.set()
        for _ in held:
            active.release()
        await asyncio.wait(tasks, timeout=60)
    return samples, counts


def report(samples: list[dict[str, float]], counts: Counts, warmup: float) -> str:
    after = [s for s in samples if s["t_min"] >= warmup] or samples
    keys = sorted({k for s in samples for k in s if k not in ("t_min", "requests")})
    minutes = after[-1]["t_min"] - after[0]["t_min"] if len(after) > 1 else float("nan")
    requests = after[-1]["requests"] - after[0]["requests"] if len(after) > 1 else 0
    lines = [
        f"requests: {counts.total} ({counts.ok} ok, {counts.cancelled} cancelled, {counts.refused} refused as bad input or shed, errors {counts.errors or 0})",
        f"after {warmup:g} min of warm-up: {minutes:.1f} min, {requests:.0f} requests",
        "",
        "| process | RSS first (MiB) | RSS last (MiB) | slope (MiB/min) | per request (KiB) |",
        "|---|---|---|---|---|",
    ]
    for key in keys:
        pts = [(s["t_min"], s[key]) for s in after if key in s]
        if len(pts) < 2:
            continue
        k = slope([p[0] for p in pts], [p[1] for p in pts])
        per_request = k * minutes * 1024 / requests if requests else float("nan")
        lines.append(f"| {key} | {pts[0][1]:.1f} | {pts[-1][1]:.1f} | {k:+.3f} | {per_request:+.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=None, help="minutes left out of the slope (default: a fifth of the run)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--min-clients", type=int, default=8)
    parser.add_argument("--max-clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", default=f"--model {TINY_MODEL} --devices cpu,cpu --kv-cache-memory 64MiB")
    parser.add_argument("--out", type=Path, default=None, help="also write the samples (JSON lines) and the report here")
    args = parser.parse_args()
    server = ServerProcess(args.server_args.split()).start()
    try:
        samples, counts = asyncio.run(drive(server, args))
        leaked = server.wait_idle(60)
        assert all(w.kv_blocks_free == w.kv_blocks_total for w in leaked.workers), "KV blocks still held after the soak"
    finally:
        server.stop()
    text = report(samples, counts, args.warmup if args.warmup is not None else args.minutes / 5)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        (args.out / "soak.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
