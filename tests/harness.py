"""Start real VisionChat server processes on 127.0.0.1 for the integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY_MODEL = FIXTURES / "tiny-phi35v"
GOLDEN = FIXTURES / "golden"
IMAGES = GOLDEN / "images"
# VISIONCHAT_TEST_DEVICE=cuda:0 (or npu:0) runs the model, engine and server tests on that device.
TEST_DEVICE = os.environ.get("VISIONCHAT_TEST_DEVICE", "cpu")
LISTEN = re.compile(r"listening on \S+:(\d+) metrics on (?:\S+:(\d+)|off)")


def image_bytes(name: str) -> bytes:
    return (IMAGES / f"{name}.png").read_bytes()


@dataclass
class ServerProcess:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    metrics_port: int = 0
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=2000))

    host: str = "127.0.0.1"
    health_port: int = 0  # a plaintext health-only port (--health-port), for servers whose main port is TLS

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches the server (a wildcard bind is reached on loopback)."""
        return {"::": "[::1]", "[::]": "[::1]", "0.0.0.0": "127.0.0.1"}.get(self.host, self.host)

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        devices = [] if "--devices" in self.args else ["--devices", TEST_DEVICE]
        cmd = [sys.executable, "-m", "service", "--host", self.host, "--port", "0", "--metrics-port", "0", *devices, *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        # The server's output is drained by a reader thread so a chatty log never blocks it.
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        deadline = time.time() + timeout
        while not self.port:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        self.wait_serving(deadline - time.time())
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTEN.search(line)
            if m:
                self.metrics_port = int(m.group(2) or -1)
                self.port = int(m.group(1))

    def health(self, service: str = "") -> int:
        address = f"{self.connect_host}:{self.health_port}" if self.health_port else self.address
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "\n".join(self.lines))
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server never became SERVING:\n" + "\n".join(self.lines))

    def stub(self, channel: grpc.Channel) -> pb_grpc.VisionChatServiceStub:
        return pb_grpc.VisionChatServiceStub(channel)

    def model_info(self) -> pb.GetModelInfoResponse:
        with grpc.insecure_channel(self.address) as ch:
            return pb_grpc.VisionChatServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

    def wait_idle(self, timeout: float = 30.0) -> pb.GetModelInfoResponse:
        """Wait until every live worker has all KV blocks free and nothing running or waiting."""
        deadline = time.time() + timeout
        info = self.model_info()
        while time.time() < deadline:
            info = self.model_info()
            if all(
                w.alive and w.kv_blocks_free == w.kv_blocks_total and w.running_requests == 0 and w.waiting_requests == 0
                for w in info.workers
            ):
                return info
            time.sleep(0.1)
        raise AssertionError(f"workers not idle after {timeout}s: {info.workers}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.connect_host}:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        found = False
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
                found = True
        return total if found else 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (children of the server)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        pids = []
        for pid in out.split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "spawn_main" in cmdline:  # not the resource tracker, not the preprocessing forkserver
                pids.append(int(pid))
        return sorted(pids)  # spawned in worker order on a fresh server


def user(text: str, *images: int) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, text=text, image_indices=list(images))


def generate_request(
    text: str,
    images: list[bytes] | tuple[bytes, ...] = (),
    num_crops: int | None = None,
    **sampling: object,
) -> pb.GenerateRequest:
    opts = pb.ImageOptions(num_crops=num_crops) if num_crops else pb.ImageOptions()
    return pb.GenerateRequest(
        messages=[user(text, *range(len(images)))],
        images=list(images),
        image_options=opts,
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def collect(responses: Iterable[pb.GenerateResponse]) -> tuple[list[int], str, pb.ChatFinished]:
    ids: list[int] = []
    text = ""
    finished = None
    for r in responses:
        if r.HasField("delta"):
            ids += [t.token_id for t in r.delta.tokens]
            text += r.delta.text
        else:
            finished = r.finished
    assert finished is not None, "stream ended without a finished message"
    return ids, text, finished


def node_chat_client() -> list[str]:
    """The command of the Node client (client/node/chat.js); skips without node or its npm packages, and
    fails under CI, where `make setup` must have installed them."""
    import shutil

    import pytest

    node = shutil.which("node")
    node_dir = ROOT / "client" / "node"
    if node is None or not (node_dir / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if os.environ.get("CI"):
            pytest.fail("node or the npm packages of client/node are missing; `make setup` installs them")
        pytest.skip("node or the npm packages of client/node are missing")
    return [node, str(node_dir / "chat.js")]


def stream_text_until(server: ServerProcess, stop: threading.Event, times: list[float], timeout: float = 600) -> None:
    """A long text stream (1,500 tokens) that records when each delta arrives, until `stop` is set: the
    neighbour whose pace a heavy request must not break."""
    with grpc.insecure_channel(server.address) as ch:
        req = generate_request("Write a haiku about the sea.", max_new_tokens=1500, ignore_eos=True)
        for r in pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=timeout):
            if r.HasField("delta") and r.delta.tokens:
                times.append(time.time())
            if stop.is_set():
                break
