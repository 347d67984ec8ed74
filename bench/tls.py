"""TLS cost: 16 concurrent streams against the same server configuration with and without TLS, in one run.

    make bench          # runs this after bench/serving.py
    .venv/bin/python bench/tls.py --help

A self-signed CA and server certificate are made at start (cryptography). Two servers (tiny fixture
model, 1 worker) are started one after the other, plaintext and TLS (with a bearer-token file, as a
secured deployment runs), and each serves --rounds rounds of --streams concurrent streams × --tokens
greedy tokens, alternating. Reported: tokens/s of each (median) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from certs import Authority  # noqa: E402
from harness import TINY_MODEL, ServerProcess  # noqa: E402

from service.security.tokens import hash_token  # noqa: E402

TOKEN = "bench-token"


async def phase(channel: grpc.aio.Channel, streams: int, tokens: int) -> float:
    stub = pb_grpc.VisionChatServiceStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    async def one(i: int) -> int:
        req = pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, text=f"Write a haiku about the sea ({i}).")],
            sampling=pb.SamplingParams(max_new_tokens=tokens, ignore_eos=True),
        )
        return sum([len(r.delta.tokens) async for r in stub.Generate(req, timeout=600, metadata=metadata)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - start)


async def measure(server: ServerProcess, ca: Path | None, streams: int, tokens: int) -> float:
    options = [("grpc.ssl_target_name_override", "localhost")] if ca else []
    if ca is None:
        channel = grpc.aio.insecure_channel(server.address)
    else:
        channel = grpc.aio.secure_channel(server.address, grpc.ssl_channel_credentials(ca.read_bytes()), options=options)
    async with channel:
        await phase(channel, 2, 4)  # warm: connection, handshake, caches
        return await phase(channel, streams, tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="visionchat-bench-tls-"))
    ca = Authority.create(folder, "bench-ca")
    issued = ca.issue("bench-server", server=True, dns=("localhost",))
    tokens = folder / "tokens.txt"
    tokens.write_text(f"{hash_token(TOKEN)} bench\n")
    base = ["--model", str(TINY_MODEL), "--auth-token-file", str(tokens)]
    rates: dict[str, list[float]] = {"plaintext": [], "TLS": []}
    for _ in range(args.rounds):
        for name in rates:
            extra = ["--tls-cert-file", str(issued.cert), "--tls-key-file", str(issued.key)] if name == "TLS" else []
            health = ["--health-port", "0"]
            server = ServerProcess([*base, *extra, *health])
            if name == "TLS":
                server = tls_process(server)
            server.start(timeout=600)
            try:
                rates[name].append(asyncio.run(measure(server, ca.pem_path if name == "TLS" else None, args.streams, args.tokens)))
            finally:
                server.stop()
    plain, tls = statistics.median(rates["plaintext"]), statistics.median(rates["TLS"])
    print(f"\n{args.streams} streams x {args.tokens} greedy tokens, tiny model, bearer tokens on, median of {args.rounds}:\n")
    print("| transport | tokens/s | vs plaintext |")
    print("|---|---|---|")
    print(f"| plaintext | {plain:,.1f} | 1.00× |")
    print(f"| TLS | {tls:,.1f} | {tls / plain:.2f}× |")
    return 0


def tls_process(server: ServerProcess) -> ServerProcess:
    """The harness checks readiness over plaintext health: give the TLS server a health port for it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a for a in server.args]
    args[args.index("--health-port") + 1] = str(port)
    return ServerProcess(args, health_port=port)


if __name__ == "__main__":
    sys.exit(main())
