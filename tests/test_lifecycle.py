"""Server lifecycle against real processes: SIGTERM draining, the embedded default model, and the
Kubernetes manifests' flags and probes served for real."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from harness import TINY_MODEL, ServerProcess, collect, generate_request, image_bytes
from test_deploy_manifests import _container, server_env
from visionchat.v1 import visionchat_pb2 as pb
from visionchat.v1 import visionchat_pb2_grpc as pb_grpc


def test_sigterm_drains_running_streams_refuses_new_ones_and_exits_zero() -> None:
    proc = ServerProcess(["--model", str(TINY_MODEL), "--kv-cache-memory", "32MiB", "--drain-seconds", "60"]).start()
    result: dict[str, object] = {}
    started = threading.Event()

    def long_stream() -> None:
        with grpc.insecure_channel(proc.address) as ch:
            ids: list[int] = []
            fin = None
            for r in pb_grpc.VisionChatServiceStub(ch).Generate(generate_request("Write a haiku about the sea.", max_new_tokens=400, ignore_eos=True), timeout=120):
                if r.HasField("delta"):
                    ids += [t.token_id for t in r.delta.tokens]
                    started.set()
                else:
                    fin = r.finished
            result["ids"], result["finished"] = ids, fin

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)

    deadline = time.time() + 5
    while proc.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.time() < deadline, "health did not go NOT_SERVING after SIGTERM"
        time.sleep(0.02)
    with grpc.insecure_channel(proc.address) as ch:
        stub = pb_grpc.VisionChatServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Generate(generate_request("hello", max_new_tokens=2), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            stub.CountTokens(pb.CountTokensRequest(messages=[pb.Message(role=pb.ROLE_USER, text="hi")]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    t.join(120)
    assert len(result["ids"]) == 400  # type: ignore[arg-type]
    assert result["finished"].finish_reason == pb.FINISH_REASON_LENGTH  # type: ignore[union-attr]
    assert proc.proc.wait(60) == 0


def test_sigterm_during_an_upload_lets_it_finish() -> None:
    proc = ServerProcess(["--model", str(TINY_MODEL), "--kv-cache-memory", "32MiB", "--drain-seconds", "60"]).start()
    image = image_bytes("C_200x900")
    half = len(image) // 2
    sigterm_sent = threading.Event()
    start = pb.ChatStart(
        messages=[pb.Message(role=pb.ROLE_USER, text="What is this?", image_indices=[0])],
        sampling=pb.SamplingParams(max_new_tokens=8, ignore_eos=True),
        image_count=1,
    )

    def requests():  # type: ignore[no-untyped-def]
        yield pb.ChatRequest(start=start)
        yield pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=0, data=image[:half]))
        assert sigterm_sent.wait(30)
        time.sleep(1.5)  # the rest of the upload arrives well after SIGTERM
        yield pb.ChatRequest(image_chunk=pb.ImageChunk(image_index=0, data=image[half:]))
        yield pb.ChatRequest(end_of_input=pb.EndOfInput())

    result: dict[str, object] = {}

    def call() -> None:
        with grpc.insecure_channel(proc.address) as ch:
            result["out"] = collect(pb_grpc.VisionChatServiceStub(ch).Chat(requests(), timeout=60))

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)  # the upload has started
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    sigterm_sent.set()
    t.join(60)
    ids, _, fin = result["out"]  # type: ignore[misc]
    from service.processor.image import num_image_tokens

    assert len(ids) == 8 and fin.usage.image_tokens == num_image_tokens(200, 900, 16)
    assert proc.proc.wait(60) == 0


def test_worker_warmup_fits_tiny_limits() -> None:
    proc = ServerProcess(
        ["--model", str(TINY_MODEL), "--kv-cache-memory", "1MiB", "--max-image-embed-tokens", "200"]
    ).start()
    try:
        assert proc.model_info().workers[0].kv_blocks_total == 21
    finally:
        assert proc.stop() == 0


def test_embedded_default_model_serves_a_real_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # No --model: the server generates its small checkpoint into the cache and serves it.
    proc = ServerProcess(["--kv-cache-memory", "32MiB", "--model-cache-dir", str(tmp_path)]).start()
    try:
        info = proc.model_info()
        assert info.model_id == "visionchat-embedded-tiny-random"
        with grpc.insecure_channel(proc.address) as ch:
            req = generate_request("Describe this image.", [image_bytes("A_640x480")], max_new_tokens=8, ignore_eos=True)
            ids, text, fin = collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=60))
        assert len(ids) == 8 and text and fin.usage.image_tokens == 1921
        assert any(p.name.startswith("default-model-") for p in tmp_path.iterdir())
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("overlay", ["cpu"])
def test_manifest_flags_start_the_server_and_its_probes_pass(overlay: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Start the server with the overlay's ConfigMap/env and probe it as the kubelet would."""
    import socket

    from certs import Authority

    from service.security.tokens import hash_token

    env = server_env(overlay)
    # Only what cannot hold on this machine is overridden: loopback, free ports, the fixture model, a
    # small KV pool (the CPU overlay sizes it for a real node), and the Secrets' files (made here).
    ca = Authority.create(tmp_path, "ca")
    server_cert = ca.issue("server", server=True, dns=("localhost",))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{hash_token('probe-token')} probe-test\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        health = s.getsockname()[1]
    args = [
        "--model", str(TINY_MODEL), "--kv-cache-memory", "32MiB", "--health-port", str(health),
        "--tls-cert-file", str(server_cert.cert), "--tls-key-file", str(server_cert.key), "--auth-token-file", str(tokens),
    ]
    assert {"VISIONCHAT_TLS_CERT_FILE", "VISIONCHAT_TLS_KEY_FILE", "VISIONCHAT_AUTH_TOKEN_FILE"} <= set(env)
    proc = ServerProcess(args, env=env, health_port=health).start()
    try:
        container = _container(overlay)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == int(env["VISIONCHAT_PORT"]) and ports["metrics"] == int(env["VISIONCHAT_METRICS_PORT"])
        assert ports["health"] == int(env["VISIONCHAT_HEALTH_PORT"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]["grpc"]
            assert spec["port"] in (ports["health"], "health")  # plaintext: the gRPC port speaks TLS
            assert proc.health(spec.get("service", "")) == health_pb2.HealthCheckResponse.SERVING, probe
        # JSON logs as the ConfigMap asks, one line per finished request (over TLS, with a token).
        creds = grpc.ssl_channel_credentials(ca.pem_path.read_bytes())
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(proc.address, creds, options=options) as ch:
            req = generate_request("hi", max_new_tokens=2)
            metadata = (("authorization", "Bearer probe-token"),)
            collect(pb_grpc.VisionChatServiceStub(ch).Generate(req, timeout=60, metadata=metadata))
        deadline = time.time() + 10
        while not any('"event":"request_finished"' in line and "probe-test" in line for line in proc.lines):
            assert time.time() < deadline, list(proc.lines)[-5:]
            time.sleep(0.05)
        assert "visionchat_workers_alive 1.0" in proc.metrics_text()
    finally:
        assert proc.stop() == 0


def _broken_model(tmp_path, how: str):  # type: ignore[no-untyped-def]
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    if how == "missing tokenizer":
        (folder / "tokenizer.json").unlink()
        return folder, "tokenizer.json"
    if how == "missing shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
        return folder, "model-00002-of-00002.safetensors"
    if how == "corrupt safetensors":
        shard = folder / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])
        return folder, "model-00001-of-00002.safetensors"
    if how == "another model type":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder, "model_type='llama'"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing tokenizer", "missing shard", "corrupt safetensors", "another model type", "unknown dtype"])
def test_bad_model_folder_or_flag_is_one_clear_error_at_startup(tmp_path, how: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from harness import ROOT

    prefix = "visionchat-server: cannot start:"
    if how == "unknown dtype":  # a flag's value: refused while parsing flags, before anything loads
        args, expected, prefix = ["--model", str(TINY_MODEL), "--dtype", "int3"], "--dtype 'int3'", "configuration error:"
    else:
        folder, expected = _broken_model(tmp_path, how)
        args = ["--model", str(folder)]
    run = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "-1", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix) and expected in last, last
