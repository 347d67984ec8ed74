"""`make device-check`: everything the first GPU or NPU run must show, in one command (<= 10 minutes).

    make device-check                                   # the device in VISIONCHAT_TEST_DEVICE (default: cuda:0)
    VISIONCHAT_TEST_DEVICE=cpu make device-check        # dry run on the CPU
    .venv/bin/python tools/device_check.py --device npu:0 --out report.json

Checks, each reported with its numbers (a failing check does not stop the others):
  environment   torch, the device, native bf16, the attention backends available, memory
  parity-fp32   the golden parity and engine tests on the device in fp32 (TF32 off)
  bf16          greedy agreement of bf16 with the fp32 golden tokens, logit differences
  attention     the portable paged attention on the device vs the CPU: 64 decodes, one at 16K tokens
  memory        the profiled peak of a worker vs the peak of a real full batch
  serving       1, 16 and 32 concurrent streams: tokens/s and TTFT through a real server
  workers       two workers sharing the device, one killed: the other serves on, it comes back
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from harness import GOLDEN, TINY_MODEL, ServerProcess, collect, generate_request  # noqa: E402

from service.engine import Engine, EngineConfig, EngineRequest, SamplingOptions  # noqa: E402
from service.model import load_model  # noqa: E402
from service.model.attention import AttentionMetadata, DecodeGroup, TorchPagedAttention, decode_groups  # noqa: E402
from service.platform import platform_for  # noqa: E402


def check_environment(device: str, quick: bool) -> dict[str, Any]:
    platform = platform_for(device)
    platform.configure_process(4)
    out: dict[str, Any] = {"torch": torch.__version__, "device": device, "default_dtype": str(platform.default_dtype())}
    kind = device.partition(":")[0]
    if kind == "cuda":
        props = torch.cuda.get_device_properties(platform.device)
        out |= {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    elif kind == "npu":
        out |= {"name": torch.npu.get_device_name(platform.device)}  # type: ignore[attr-defined]
    memory = platform.memory_info()
    if memory:
        out |= {
            "memory_total_gib": round(memory.total_bytes / 2**30, 2),
            "memory_free_gib": round(memory.free_bytes / 2**30, 2),
        }
    for module in ("flash_attn", "torch_npu"):
        try:
            __import__(module)
            out[module] = "importable"
        except Exception as exc:  # noqa: BLE001  (absent or broken: both worth reporting)
            out[module] = f"not importable ({type(exc).__name__})"
    return out


def check_parity_fp32(device: str, quick: bool) -> dict[str, Any]:
    tests = ["tests/test_model_parity.py", "tests/test_longrope.py"] if not quick else ["tests/test_model_parity.py"]
    env = {**os.environ, "VISIONCHAT_TEST_DEVICE": device}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", *tests, "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    observed = [
        line.strip()
        for line in run.stdout.splitlines()
        if "last_logits" in line or "passed" in line or "failed" in line
    ]
    return {"passed": run.returncode == 0, "summary": observed[-12:]}


def _golden_requests() -> list[tuple[EngineRequest, list[int]]]:
    import numpy as np
    from engine_helpers import image

    index = json.loads((GOLDEN / "index.json").read_text())["model"]
    out = []
    for name, meta in index.items():
        with np.load(GOLDEN / f"model_{name}.npz") as z:
            ids = tuple(int(t) for t in z["input_ids"][0])
            tokens = z["gen_tokens"].tolist()
        images = tuple(
            image((GOLDEN / "images" / f"{n}.png").read_bytes(), meta["num_crops"]) for n in meta.get("images") or []
        )
        out.append((EngineRequest(name, ids, images, SamplingOptions(max_new_tokens=16), time.time()), tokens))
    return out


def check_bf16(device: str, quick: bool) -> dict[str, Any]:
    platform = platform_for(device)
    model, _ = load_model(TINY_MODEL, torch.bfloat16, platform.device, progress=False)
    engine = Engine(
        model,
        EngineConfig(max_model_len=4096, kv_cache_memory_bytes=64 << 20),
        platform.attention_backend("auto", 256 << 20),
        platform,
    )
    cases = _golden_requests()
    out = engine.run_to_completion([req for req, _ in cases])
    agree = total = 0
    first_divergence = {}
    for req, golden in cases:
        got = out[req.request_id]
        same = next((i for i, (a, b) in enumerate(zip(got, golden, strict=False)) if a != b), len(golden))
        first_divergence[req.request_id] = same
        agree += sum(a == b for a, b in zip(got, golden, strict=False))
        total += len(golden)
    return {"token_agreement": round(agree / total, 3), "first_divergence_by_case": first_divergence}


def check_attention(device: str, quick: bool) -> dict[str, Any]:
    """64 decode sequences of mixed lengths (one of 16,384 tokens) through the portable attention on
    the device and on the CPU, from the same paged cache: the largest difference."""
    gen = torch.Generator().manual_seed(0)
    kv_heads, heads, head_dim, block = 32, 32, 96, 16
    lengths = [int(x) for x in torch.randint(16, 2048, (63,), generator=gen)] + [16384]
    lengths.sort(reverse=True)
    blocks_per = [-(-n // block) for n in lengths]
    num_blocks = sum(blocks_per) + 1
    dtype = torch.float32
    cache = torch.randn(2, kv_heads, num_blocks, block, head_dim, generator=gen, dtype=dtype) * 0.5
    q = torch.randn(len(lengths), heads, head_dim, generator=gen, dtype=dtype)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables, at = [], 0
    for n in blocks_per:
        tables.append(order[at : at + n].tolist())
        at += n

    def run(dev: torch.device, workspace: int) -> torch.Tensor:
        backend = TorchPagedAttention(workspace_bytes=workspace)
        room = backend.decode_group_tokens(kv_heads, head_dim, dtype)
        groups = []
        for start, count in decode_groups([len(t) * block for t in tables], room):
            rows, width = tables[start : start + count], len(tables[start])
            table = torch.tensor([t + [0] * (width - len(t)) for t in rows], device=dev)
            groups.append(
                DecodeGroup(
                    start, count, table, torch.tensor(lengths[start : start + count], device=dev), lengths[start]
                )
            )
        meta = AttentionMetadata(torch.zeros(len(lengths), dtype=torch.long, device=dev), len(lengths), groups, [])
        local_cache = cache.to(dev)
        # Write a token into block 0 only (a scratch block): the cache of the sequences stays as made.
        k = local_cache[0, :, 0, 0].unsqueeze(0).expand(len(lengths), -1, -1).contiguous()
        v = local_cache[1, :, 0, 0].unsqueeze(0).expand(len(lengths), -1, -1).contiguous()
        out = backend.forward(q.to(dev), k, v, local_cache, meta, head_dim**-0.5)
        platform_for(str(dev)).synchronize()
        return out.cpu()

    device_out = run(torch.device(device), 256 << 20)
    cpu_out = run(torch.device("cpu"), 64 << 20)
    return {
        "sequences": len(lengths),
        "longest": max(lengths),
        "max_abs_diff": float((device_out - cpu_out).abs().max()),
    }


def check_memory(device: str, quick: bool) -> dict[str, Any]:
    from service.worker.kv_budget import profile_peak
    from service.worker.probes import profile_requests

    platform = platform_for(device)
    if platform.memory_info() is None:
        return {"skipped": "no device memory to measure on this platform"}
    model, _ = load_model(TINY_MODEL, platform.default_dtype(), platform.device, progress=False)
    backend = platform.attention_backend("auto", 256 << 20)
    config = EngineConfig(max_model_len=8192, kv_cache_memory_bytes=0, max_num_batched_tokens=2048, max_num_seqs=64)
    profiled = profile_peak(config, model, backend, platform)
    # The real thing: a KV pool, the whole decode batch at long contexts, a full prefill chunk.
    engine = Engine(
        model, EngineConfig(max_model_len=8192, kv_cache_memory_bytes=512 << 20, max_num_seqs=64), backend, platform
    )
    pool = engine.kv_cache.layers[0].numel() * engine.kv_cache.layers[0].element_size() * len(engine.kv_cache.layers)
    platform.reset_peak()
    requests = [
        EngineRequest(f"r{i}", (1,) + (29871,) * (1000 + 37 * i), (), SamplingOptions(max_new_tokens=8), time.time())
        for i in range(64)
    ]
    engine.run_to_completion(requests + profile_requests(config, model.config.eos_token_id)[:1])
    real = platform.peak_bytes() - pool
    return {
        "profiled_peak_gib": round(profiled / 2**30, 3),
        "real_peak_gib": round(real / 2**30, 3),
        "covered": profiled >= real,
    }


def check_serving(device: str, quick: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "serving.py"),
        "--configs",
        "tiny",
        "--streams",
        "16,32",
        "--requests-per-stream",
        "1" if quick else "2",
        "--baseline-requests",
        "3" if quick else "6",
        "--server-args",
        f"--devices {device}",
        "--json",
        "/tmp/device-check-serving.json",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    if run.returncode:
        return {"failed": run.stderr[-1500:]}
    (report,) = json.loads(Path("/tmp/device-check-serving.json").read_text())
    return {
        p["name"]: {
            "tok_s": p["tokens_per_second"],
            "ttft_p50_ms": p["ttft_p50_ms"],
            "itl_p50_ms": p["itl_p50_ms"],
            "step_overhead_ms": p["step_overhead_ms"],
        }
        for p in report["phases"]
    }


def check_workers(device: str, quick: bool) -> dict[str, Any]:
    proc = ServerProcess(
        [
            "--model",
            str(TINY_MODEL),
            "--devices",
            device,
            "--workers-per-device",
            "2",
            "--kv-cache-memory",
            "auto" if device != "cpu" else "64MiB",
        ]
    ).start(timeout=300)
    try:
        import grpc
        from visionchat.v1 import visionchat_pb2_grpc as pb_grpc

        def ask() -> int:
            with grpc.insecure_channel(proc.address) as ch:
                ids, _, _ = collect(
                    pb_grpc.VisionChatServiceStub(ch).Generate(
                        generate_request("hello", max_new_tokens=8, ignore_eos=True), timeout=120
                    )
                )
            return len(ids)

        before = [ask() for _ in range(4)]
        os.kill(proc.worker_pids()[0], signal.SIGKILL)
        during = [ask() for _ in range(4)]
        deadline = time.time() + 240  # the killed worker is restarted in the background
        while not all(w.alive for w in proc.model_info().workers) and time.time() < deadline:
            time.sleep(1)
        after = [w.alive for w in proc.model_info().workers]
        return {
            "before": before,
            "served_while_one_was_dead": during,
            "both_alive_after": after,
            "ok": all(n == 8 for n in before + during) and after == [True, True],
        }
    finally:
        proc.stop()


CHECKS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "environment": check_environment,
    "parity-fp32": check_parity_fp32,
    "bf16": check_bf16,
    "attention": check_attention,
    "memory": check_memory,
    "serving": check_serving,
    "workers": check_workers,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=os.environ.get("VISIONCHAT_TEST_DEVICE", "cuda:0"))
    parser.add_argument("--quick", action="store_true", help="smaller runs (the CPU dry run)")
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    failed = False
    for name in args.only.split(","):
        start = time.time()
        try:
            report[name] = CHECKS[name](args.device, args.quick)
        except Exception as exc:  # noqa: BLE001  (a device check reports every failure and goes on)
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            failed = True
        failed |= report[name].get("ok") is False or report[name].get("passed") is False
        report[name]["seconds"] = round(time.time() - start, 1)
        print(f"## {name}\n{json.dumps(report[name], indent=2, default=str)}\n", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
