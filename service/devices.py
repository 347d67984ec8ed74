"""`--devices` -> one worker per device, and how many CPU threads each worker may use."""

from __future__ import annotations

import importlib.util
import os


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _npu_count() -> int:
    # torch_npu is an optional extra: only probe it when installed.
    if importlib.util.find_spec("torch_npu") is None:
        return 0
    import torch
    import torch_npu  # noqa: F401  (registers the npu device)

    return torch.npu.device_count() if torch.npu.is_available() else 0  # type: ignore[attr-defined]


def resolve_devices(spec: str) -> list[str]:
    """'auto' -> all CUDA GPUs, else all NPUs, else one CPU; otherwise the comma-separated list."""
    spec = spec.strip()
    if spec == "auto":
        if n := _cuda_count():
            return [f"cuda:{i}" for i in range(n)]
        if n := _npu_count():
            return [f"npu:{i}" for i in range(n)]
        return ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise ValueError("--devices is empty")
    found: dict[str, int] = {}  # accelerator kind -> devices on this host, probed once
    for d in devices:
        kind, _, index = d.partition(":")
        if kind not in ("cpu", "cuda", "npu") or (index and not index.isdigit()):
            raise ValueError(f"--devices: unknown device {d!r} (use cpu, cuda:N or npu:N)")
        if kind == "cpu":
            continue
        if kind not in found:
            found[kind] = _cuda_count() if kind == "cuda" else _npu_count()
        if int(index or 0) >= found[kind]:
            raise ValueError(f"--devices: {d} is not available on this host ({found[kind]} {kind} device(s) found)")
    return devices


def cpu_threads_per_worker(devices: list[str]) -> dict[int, int]:
    """Split the host's cores between CPU workers so they do not oversubscribe each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_workers = [i for i, d in enumerate(devices) if d == "cpu"]
    # One core stays with the frontend: gRPC streaming, tokenization and detokenization run there,
    # and a worker whose threads fight it for that core slows every stream.
    share = max(1, (cores - 1) // max(1, len(cpu_workers)))
    # Accelerator workers only feed their device: a couple of threads is plenty.
    return {i: (share if d == "cpu" else min(4, cores)) for i, d in enumerate(devices)}
