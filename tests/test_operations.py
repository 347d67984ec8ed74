"""What a newcomer and an operator run into: installed commands that work from anywhere, clean
start-up errors, fast --help, IPv6, long-latency histograms, reflection v1, quiet shutdowns."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2 as reflection_messages
from clips import make_clip
from harness import ROOT, TINY_MODEL, ServerProcess, collect, generate_request, user
from PIL import Image
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

from client.errors import FieldViolation, RpcErrorInfo

VENV_BIN = Path(sys.executable).parent
TINY = ["--model", str(TINY_MODEL), "--dtype", "float32", "--kv-cache-memory", "16MiB"]


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_failure(args: list[str], timeout: float = 120) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr


# --- 1. installed commands, from any directory ----------------------------------------------------------


def test_readme_commands_run_as_written_from_another_directory(server: ServerProcess, tmp_path: Path) -> None:
    for name in ("a.jpg", "b.png"):
        Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / name)
    (tmp_path / "clip.mp4").write_bytes(make_clip("mp4", frames=24, fps=12))
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    commands = [line.strip() for line in readme_block("## Calling it").splitlines() if line.strip()]
    assert len(commands) >= 5 and all(c.startswith(("visionchat ", "visionchat-server ")) for c in commands)
    for command in commands:
        argv = shlex.split(command.replace("127.0.0.1:50051", server.address))
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert done.stdout.strip(), command


# --- 2, 3. ports -------------------------------------------------------------------------------------


def test_a_taken_grpc_port_is_one_line_and_never_shared() -> None:
    first = ServerProcess(TINY).start()
    try:
        # Another process holds the port: grpcio's SO_REUSEPORT default would let a second server
        # start and split the traffic.
        code, out = start_failure([*TINY, "--host", "127.0.0.1", "--port", str(first.port), "--metrics-port", "-1"])
        assert code == 2, out
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines == [f"visionchat-server: cannot start: cannot listen on 127.0.0.1:{first.port} (--host/--port): the address is in use or not available here"], out
    finally:
        first.stop()


def test_a_taken_metrics_port_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out = start_failure([*TINY, "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port)])
    assert code == 2, out
    assert [line for line in out.splitlines() if line.strip()] == [
        f"visionchat-server: cannot start: cannot serve metrics on 127.0.0.1:{port} (--metrics-port): Address already in use"
    ], out


def test_default_metrics_port_is_not_prometheus_own() -> None:
    from service.config import parse_config

    config, _ = parse_config([])
    assert config.metrics_port not in (9090, 9091, 9093, 9100, 9400)


# --- 4, 5. fast help, one-line errors, small things ------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["--block-size", "0"], ["--dtype", "float64"], ["--devices", "tpu:0"]])
def test_help_and_configuration_errors_import_neither_torch_nor_transformers(argv: list[str]) -> None:
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['visionchat-server', *{argv!r}]\n"
        "try:\n    runpy.run_module('service', run_name='__main__')\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stderr, done.stderr
    if argv != ["--help"]:
        assert done.stderr.count("configuration error") == 1


def test_metrics_off_is_said_so_and_errors_print_their_detail_once() -> None:
    proc = ServerProcess([*TINY, "--metrics-port", "-1"]).start()
    try:
        assert proc.metrics_port == -1
        assert any(line.endswith("metrics on off") for line in proc.lines)
    finally:
        proc.stop()
    info = RpcErrorInfo(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be between 0 and 1, got 2.0", [FieldViolation("sampling.top_p", "must be between 0 and 1, got 2.0")])
    assert info.lines() == ["error: INVALID_ARGUMENT: sampling.top_p: must be between 0 and 1, got 2.0"]


def test_demo_streams_text_without_server_log_lines() -> None:
    env = {**os.environ, "PORT": str(free_port()), "METRICS_PORT": str(free_port())}
    done = subprocess.run(["bash", "tools/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    streamed = done.stdout.split("Describe this image.\"", 1)[1].split("(the embedded default model", 1)[0]
    assert streamed.strip() and not re.search(r"\b(INFO|WARNING|request finished|loading shards)\b", streamed), streamed


def test_makefile_names_the_readme_set_up_commands() -> None:
    header = (ROOT / "Makefile").read_text().splitlines()[0]
    assert "`make demo` and `make test`" in header


def test_role_order_message_is_english(server: ServerProcess) -> None:
    req = pb.GenerateRequest(messages=[user("Hi"), user("again")], sampling=pb.SamplingParams(max_new_tokens=2))
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as info:
        collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=30))
    assert "expected an assistant message" in info.value.details()


# --- 7. IPv6 ------------------------------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::", "[::]"])
def test_ipv6_wildcard_serves_grpc_and_metrics_on_loopback(host: str) -> None:
    proc = ServerProcess(TINY, host=host).start()
    try:
        assert any("listening on [::]:" in line for line in proc.lines)
        with grpc.insecure_channel(proc.address) as ch:  # [::1]:port
            ids, _, _ = collect(pb_grpc.VisionChatServiceStub(ch).Generate(generate_request("hi", max_new_tokens=2, ignore_eos=True), timeout=60))
        assert len(ids) == 2
        assert "visionchat_build_info" in proc.metrics_text()
    finally:
        proc.stop()


# --- 8. histograms --------------------------------------------------------------------------------------


def test_latency_histograms_reach_hours(server: ServerProcess) -> None:
    text = server.metrics_text()
    for family, top in (
        ("visionchat_time_to_first_token_seconds", "2560.0"),
        ("visionchat_request_queue_time_seconds", "2560.0"),
        ("visionchat_e2e_request_latency_seconds", "7680.0"),
        ("grpc_server_handling_seconds", "7680.0"),
    ):
        assert re.search(rf'^{family}_bucket{{[^}}]*le="{re.escape(top)}"', text, re.M), family


# --- 9. errors blamed on the right field, sizes, quiet worker exits --------------------------------------


def test_a_prompt_larger_than_the_kv_pool_is_blamed_on_messages() -> None:
    proc = ServerProcess([*TINY[:-2], "--kv-cache-memory", "1MiB", "--max-new-tokens", "4", "--default-max-new-tokens", "4"]).start()  # 341 tokens of KV
    try:
        req = generate_request("the sea is calm tonight " * 100, max_new_tokens=4)
        with grpc.insecure_channel(proc.address) as ch, pytest.raises(grpc.RpcError) as info:
            collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("messages:") and "KV pool" in info.value.details(), info.value.details()
    finally:
        proc.stop()


def test_count_tokens_reports_the_processed_size_too(server: ServerProcess) -> None:
    from harness import image_bytes

    req = pb.CountTokensRequest(messages=[user("What?", 0)], images=[image_bytes("B_1024x300")], image_options=pb.ImageOptions(num_crops=4))
    with grpc.insecure_channel(server.address) as ch:
        image = pb_grpc.VisionChatServiceStub(ch).CountTokens(req, timeout=30).images[0]
    assert (image.width, image.height) == (1024, 300)
    assert (image.processed_width, image.processed_height, image.crops) == (1008, 336, 4)


def test_workers_exit_quietly_when_the_frontend_is_killed() -> None:
    proc = ServerProcess([*TINY, "--devices", "cpu,cpu"]).start()
    workers = proc.worker_pids()
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    time.sleep(0.5)  # the output reader catches the last lines
    assert not [line for line in proc.lines if "Traceback" in line or "EOFError" in line], "\n".join(proc.lines)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:
        return False


def test_a_worker_that_dies_during_the_drain_is_not_restarted() -> None:
    proc = ServerProcess([*TINY, "--drain-seconds", "20"]).start()
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stream = pb_grpc.VisionChatServiceStub(ch).Generate(generate_request("Tell me a story.", max_new_tokens=3000, ignore_eos=True), timeout=60)
            next(iter(stream))  # running
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            os.kill(proc.worker_pids()[0], signal.SIGKILL)
            with pytest.raises(grpc.RpcError):
                for _ in stream:
                    pass
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()
    assert [line for line in proc.lines if "worker0 ready:" in line] and not [line for line in proc.lines if "restarting" in line]


# --- 10. reflection v1 ----------------------------------------------------------------------------------


def test_reflection_v1_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as ch:
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_messages.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_messages.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([reflection_messages.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"visionchat.v1.VisionChatService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
