"""Server configuration: one table of options, each a CLI flag with an environment-variable twin.

`OPTIONS` is the single source: argparse, the environment lookup and the README table all come from it
(`python -m service --print-config-table` prints the Markdown table).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "VISIONCHAT_"


def parse_memory(text: str) -> int:
    """parse_bytes, or "auto" as 0 (the platform decides)."""
    return 0 if text.strip().lower() == "auto" else parse_bytes(text)


def parse_bool(text: str) -> bool:
    """'true'/'false' (also 1/0, yes/no, on/off); a bare flag is true."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '1000000' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(float(s))


@dataclass(frozen=True)
class Option:
    name: str  # flag without dashes, with dashes between words
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("model", str, "", "Model folder in the Hugging Face layout; empty = the embedded default model"),
    Option(
        "host",
        str,
        "127.0.0.1",
        "Address the gRPC and metrics servers bind (IPv6 as :: or [::]; :: also accepts IPv4 where the host is "
        "dual-stack)",
    ),
    Option("port", int, 50051, "gRPC port (0 = pick a free one)"),
    Option(
        "metrics-port",
        int,
        9450,
        "Prometheus /metrics HTTP port (0 = pick a free one, -1 = off; 9090 is Prometheus' own)",
    ),
    Option("devices", str, "auto", "auto | cpu | cpu,cpu | cuda:0,cuda:1 | npu:0,... : one worker process per entry"),
    Option(
        "cpu-threads",
        int,
        0,
        "Torch threads per CPU worker; 0 = OMP_NUM_THREADS if set, else the usable CPUs (affinity and cgroup "
        "quota) split between CPU workers",
    ),
    Option(
        "dtype",
        str,
        "auto",
        "Compute dtype: auto (CPU: bf16 where the CPU has AVX512-BF16 or AMX, else fp32; GPU: bf16 where "
        "native, else fp16), float32, bfloat16, float16",
    ),
    Option("attention-backend", str, "auto", "Attention kernel: auto or torch"),
    Option(
        "attention-workspace",
        parse_bytes,
        "256MiB",
        "Per worker: keys and values gathered at once by the portable attention path; longer contexts are "
        "attended in chunks",
    ),
    Option(
        "cpu-gemm",
        str,
        "auto",
        "CPU matmul path of the model's Linears: auto (measured per weight shape at start-up), dense "
        "(torch/MKL) or onednn (prepacked weights)",
    ),
    Option(
        "kv-cache-memory",
        parse_memory,
        "auto",
        "KV-cache pool per worker in bytes (e.g. 512MiB, 20GiB); auto = 256MiB on CPU, and on accelerators what "
        "--kv-cache-fraction of the device leaves after a profiling step",
    ),
    Option(
        "kv-cache-fraction",
        float,
        0.9,
        "On accelerators with --kv-cache-memory auto: fraction of each device's memory its workers may use in all "
        "(weights, activations and KV pools, measured by a profiling step; split between a device's workers)",
    ),
    Option("workers-per-device", int, 1, "Worker processes per device in --devices (they split its memory)"),
    Option("block-size", int, 16, "Tokens per KV-cache block"),
    Option("max-num-batched-tokens", int, 2048, "Token budget of one engine step (decode tokens + prefill chunks)"),
    Option("max-num-seqs", int, 64, "Sequences running at once per worker"),
    Option("max-vision-crops", int, 16, "336-px crops per vision-tower forward (micro-batch)"),
    Option(
        "vision-tiles-per-step",
        int,
        0,
        "336-px crops one engine step may encode; 0 = the platform's choice (CPU: as many as take ~0.25 s, "
        "measured at start-up)",
    ),
    Option(
        "max-image-embed-tokens",
        int,
        32768,
        "Encoder cache of a worker, in image embedding rows: images being prefilled, then recently used ones "
        "(least recently used out first)",
    ),
    Option(
        "max-queued-requests",
        int,
        256,
        "Requests accepted but without a first token yet (preprocessing, waiting for a worker, in prefill); "
        "past it new ones get RESOURCE_EXHAUSTED",
    ),
    Option("preprocess-workers", int, 0, "Processes decoding images and tokenizing long prompts; 0 = the usable CPUs"),
    Option(
        "max-preprocess-queue",
        int,
        64,
        "Requests queued or running in the preprocessing pool; past it new ones get RESOURCE_EXHAUSTED",
    ),
    Option(
        "max-pixel-memory",
        parse_bytes,
        "2GiB",
        "Preprocessed image crops held in shared memory for requests in flight; past it new image requests get "
        "RESOURCE_EXHAUSTED",
    ),
    Option(
        "worker-stall-timeout",
        float,
        120.0,
        "Seconds a worker with work may report no engine step before it is killed and restarted (its requests "
        "without tokens move to another worker); 0 = off",
    ),
    Option(
        "upload-idle-timeout",
        float,
        30.0,
        "Seconds a Chat upload may send nothing before it fails with DEADLINE_EXCEEDED",
    ),
    Option(
        "max-concurrent-uploads", int, 64, "Chat uploads in progress at once; past it new ones get RESOURCE_EXHAUSTED"
    ),
    Option("max-images", int, 32, "Images per request"),
    Option("max-image-bytes", parse_bytes, "20MiB", "Encoded bytes per image"),
    Option("max-total-image-bytes", parse_bytes, "100MiB", "Encoded image bytes per request"),
    Option("max-image-pixels", int, 40_000_000, "Pixels per decoded image (decompression-bomb guard)"),
    Option("max-videos", int, 4, "Videos per request"),
    Option(
        "max-video-bytes",
        parse_bytes,
        "128MiB",
        "Encoded bytes per video (Generate and CountTokens are also bound by --max-receive-message-bytes)",
    ),
    Option("max-total-video-bytes", parse_bytes, "256MiB", "Encoded video bytes per request"),
    Option("max-video-frames", int, 64, "Frames sampled from all videos of a request together"),
    Option("default-video-frames", int, 8, "Frames sampled from a video that sets neither num_frames nor fps"),
    Option("max-video-seconds", float, 3600.0, "Duration of a video"),
    Option("max-video-pixels", int, 8_847_360, "Pixels per video frame (4096x2160)"),
    Option(
        "max-video-decoded-frames",
        int,
        20_000,
        "Frames decoded to reach one video's sampled frames (seeking skips to keyframes; sparse keyframes cost "
        "more); known before decoding",
    ),
    Option("max-context-tokens", int, 0, "Prompt + generated tokens per request; 0 = the model's context length"),
    Option("max-new-tokens", int, 4096, "Upper bound on max_new_tokens"),
    Option("default-max-new-tokens", int, 512, "max_new_tokens when the request leaves it unset"),
    Option("max-receive-message-bytes", parse_bytes, "64MiB", "Largest gRPC message the server accepts"),
    Option(
        "max-connection-age",
        float,
        300.0,
        "Seconds before the server asks a client to reconnect (re-resolves DNS; 0 = never)",
    ),
    Option(
        "max-connection-age-grace", float, 600.0, "Seconds a stream may keep running on a connection past its max age"
    ),
    Option("drain-seconds", float, 25.0, "On SIGTERM: seconds running streams get to finish"),
    Option("log-format", str, "text", "text | json"),
    Option("log-level", str, "INFO", "Python logging level"),
    Option("model-cache-dir", str, "", "Where the embedded default model is generated (default: ~/.cache/visionchat)"),
    Option(
        "tls-cert-file",
        str,
        "",
        "PEM certificate chain of the gRPC port; with --tls-key-file turns TLS on (both re-read when they change)",
    ),
    Option("tls-key-file", str, "", "PEM private key of --tls-cert-file"),
    Option("tls-client-ca-file", str, "", "PEM bundle of the CAs that sign client certificates (mutual TLS)"),
    Option(
        "tls-client-auth", str, "none", "none | require: clients must present a certificate from --tls-client-ca-file"
    ),
    Option("metrics-tls", parse_bool, False, "Serve /metrics over HTTPS with the gRPC port's certificate and key"),
    Option(
        "health-port",
        int,
        0,
        "Plaintext port on --host serving only grpc.health.v1 (kubelet probes cannot speak TLS); 0 = off",
    ),
    Option(
        "auth-token-file",
        str,
        "",
        "File of bearer-token hashes and their tenants (README, Security); re-read on change",
    ),
    Option(
        "auth-client-cert-tenant",
        parse_bool,
        False,
        "With --tls-client-auth require: a client certificate's first DNS name (else its CN) names its tenant",
    ),
    Option("auth-open-reflection", parse_bool, False, "Serve reflection without credentials when authentication is on"),
    Option(
        "max-requests-per-tenant",
        int,
        0,
        "Chat/Generate requests one tenant may have in flight; past it RESOURCE_EXHAUSTED; 0 = no limit",
    ),
    Option(
        "allow-special-tokens-in-text",
        parse_bool,
        False,
        "Tokenize special-token strings in message text as control tokens, as the original processor does "
        "(off: as plain text, so no caller can forge turns)",
    ),
)


@dataclass(frozen=True)
class ServerConfig:
    model: str
    host: str
    port: int
    metrics_port: int
    devices: str
    cpu_threads: int
    dtype: str
    attention_backend: str
    attention_workspace: int
    cpu_gemm: str
    kv_cache_memory: int  # 0 = auto
    kv_cache_fraction: float
    workers_per_device: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_vision_crops: int
    vision_tiles_per_step: int
    max_image_embed_tokens: int
    max_queued_requests: int
    preprocess_workers: int
    max_preprocess_queue: int
    max_pixel_memory: int
    worker_stall_timeout: float
    upload_idle_timeout: float
    max_concurrent_uploads: int
    max_images: int
    max_image_bytes: int
    max_total_image_bytes: int
    max_image_pixels: int
    max_videos: int
    max_video_bytes: int
    max_total_video_bytes: int
    max_video_frames: int
    default_video_frames: int
    max_video_seconds: float
    max_video_pixels: int
    max_video_decoded_frames: int
    max_context_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_receive_message_bytes: int
    max_connection_age: float
    max_connection_age_grace: float
    drain_seconds: float
    log_format: str
    log_level: str
    model_cache_dir: str
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    tls_client_auth: str
    metrics_tls: bool
    health_port: int
    auth_token_file: str
    auth_client_cert_tenant: bool
    auth_open_reflection: bool
    max_requests_per_tenant: int
    allow_special_tokens_in_text: bool

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def authenticates(self) -> bool:
        return bool(self.auth_token_file) or self.auth_client_cert_tenant


assert [f.name for f in fields(ServerConfig)] == [o.dest for o in OPTIONS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionchat-server", description="VisionChat gRPC server")
    for opt in OPTIONS:
        env_value = os.environ.get(opt.env)
        default = opt.type(env_value) if env_value is not None else opt.default
        help_text = f"{opt.help} [env {opt.env}]"
        if opt.type is parse_bool:  # `--x` alone means true
            parser.add_argument(
                f"--{opt.name}", type=parse_bool, default=default, help=help_text, nargs="?", const=True
            )
        else:
            parser.add_argument(f"--{opt.name}", type=opt.type, default=default, help=help_text)
    parser.add_argument(
        "--print-config-table", action="store_true", help="Print the README configuration table and exit"
    )
    parser.add_argument(
        "--hash-token", metavar="TOKEN", help="Print TOKEN's hash as --auth-token-file wants it, and exit"
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    config = ServerConfig(**{o.dest: getattr(args, o.dest) for o in OPTIONS})
    validate(config)
    return config, args


def validate(config: ServerConfig) -> None:
    problems = []
    if config.block_size < 1:
        problems.append("--block-size must be >= 1")
    if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
        problems.append("--max-num-batched-tokens and --max-num-seqs must be >= 1")
    if config.max_vision_crops < 1:
        problems.append("--max-vision-crops must be >= 1")
    if config.max_image_embed_tokens < 1:
        problems.append("--max-image-embed-tokens must be >= 1")
    if config.log_format not in ("text", "json"):
        problems.append("--log-format must be text or json")
    if not 0.0 < config.kv_cache_fraction < 1.0:
        problems.append("--kv-cache-fraction must be in (0, 1)")
    if config.workers_per_device < 1:
        problems.append("--workers-per-device must be >= 1")
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        problems.append("--tls-cert-file and --tls-key-file go together")
    if config.tls_client_auth not in ("none", "require"):
        problems.append("--tls-client-auth must be none or require")
    if (config.tls_client_auth == "require" or config.tls_client_ca_file) and not config.tls:
        problems.append("--tls-client-ca-file and --tls-client-auth need --tls-cert-file and --tls-key-file")
    if config.tls_client_auth == "require" and not config.tls_client_ca_file:
        problems.append("--tls-client-auth require needs --tls-client-ca-file")
    if config.auth_client_cert_tenant and config.tls_client_auth != "require":
        problems.append("--auth-client-cert-tenant needs --tls-client-auth require")
    if config.metrics_tls and not config.tls:
        problems.append("--metrics-tls needs --tls-cert-file and --tls-key-file")
    if config.max_requests_per_tenant < 0 or config.health_port < 0:
        problems.append("--max-requests-per-tenant and --health-port must be >= 0")
    if config.max_video_frames < 1 or not 1 <= config.default_video_frames <= config.max_video_frames:
        problems.append("--max-video-frames must be >= 1 and --default-video-frames between 1 and it")
    if config.max_video_seconds <= 0 or config.max_video_pixels < 1 or config.max_video_decoded_frames < 1:
        problems.append("--max-video-seconds, --max-video-pixels and --max-video-decoded-frames must be > 0")
    if config.default_max_new_tokens > config.max_new_tokens:
        problems.append("--default-max-new-tokens exceeds --max-new-tokens")
    if config.attention_workspace < 1 << 20:
        problems.append("--attention-workspace must be at least 1MiB")
    if config.cpu_gemm not in ("auto", "dense", "onednn"):
        problems.append("--cpu-gemm must be auto, dense or onednn")
    if config.vision_tiles_per_step < 0 or config.preprocess_workers < 0:
        problems.append("--vision-tiles-per-step and --preprocess-workers must be >= 0")
    if config.max_preprocess_queue < 1 or config.max_concurrent_uploads < 1 or config.max_queued_requests < 1:
        problems.append("--max-preprocess-queue, --max-concurrent-uploads and --max-queued-requests must be >= 1")
    if config.worker_stall_timeout < 0 or config.upload_idle_timeout <= 0:
        problems.append("--worker-stall-timeout must be >= 0 and --upload-idle-timeout > 0")
    if config.dtype not in DTYPE_NAMES:
        problems.append(f"--dtype {config.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if config.metrics_port < -1 or not 0 <= config.port <= 65535 or config.metrics_port > 65535:
        problems.append("--port must be 0..65535 and --metrics-port -1..65535")
    problems += device_syntax_problems(config.devices)
    if problems:
        print("configuration error: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(2)  # argparse's code for a usage error


DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def device_syntax_problems(spec: str) -> list[str]:
    """What is wrong with --devices as written (whether the devices exist is checked at start-up)."""
    if spec.strip() == "auto":
        return []
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        return ["--devices is empty"]
    problems = []
    for d in devices:
        kind, _, index = d.partition(":")
        if kind not in ("cpu", "cuda", "npu") or (index and not index.isdigit()) or (kind == "cpu" and index):
            problems.append(f"--devices: unknown device {d!r} (use cpu, cuda:N or npu:N)")
    return problems


def bare_host(host: str) -> str:
    """The address without the brackets an IPv6 literal may come in ([::] -> ::)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """host:port as gRPC and people write it: IPv6 literals in brackets ([::1]:50051)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config_table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        default = opt.default if opt.default != "" else "(empty)"
        meaning = opt.help.replace("|", "\\|")
        rows.append(f"| `--{opt.name}` | `{opt.env}` | `{default}` | {meaning} |")
    return "\n".join(rows)
