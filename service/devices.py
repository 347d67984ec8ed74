"""`--devices` -> one worker per device, and how many CPU threads each worker may use."""

from __future__ import annotations

import importlib.util
import os

from .config import device_syntax_problems
from .platform.cpu_cores import usable_cpus


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _npu_count() -> int:
    # torch_npu is an optional extra: only probe it when installed.
    if importlib.util.find_spec("torch_npu") is None:
        return 0
    import torch

    from .platform.npu import import_torch_npu

    import_torch_npu()
    return torch.npu.device_count() if torch.npu.is_available() else 0  # type: ignore[attr-defined]


def resolve_devices(spec: str, workers_per_device: int = 1) -> list[str]:
    """One entry per worker: 'auto' -> all CUDA GPUs, else all NPUs, else one CPU; otherwise the
    comma-separated list; each device repeated `workers_per_device` times."""
    spec = spec.strip()
    if spec == "auto":
        if n := _cuda_count():
            devices = [f"cuda:{i}" for i in range(n)]
        elif n := _npu_count():
            devices = [f"npu:{i}" for i in range(n)]
        else:
            devices = ["cpu"]
        return [d for d in devices for _ in range(workers_per_device)]
    problems = device_syntax_problems(spec)
    if problems:
        raise ValueError("; ".join(problems))
    devices = [_canonical(d.strip()) for d in spec.split(",") if d.strip()]
    found: dict[str, int] = {}  # accelerator kind -> devices on this host, probed once
    for d in devices:
        kind, _, index = d.partition(":")
        if kind == "cpu":
            continue
        if devices.count(d) > 1:
            raise ValueError(
                f"--devices lists {d} {devices.count(d)} times: each worker would size its KV pool as if the "
                f"device were its own; use --workers-per-device {devices.count(d)} to share one device"
            )
        if kind not in found:
            found[kind] = _cuda_count() if kind == "cuda" else _npu_count()
        if int(index) >= found[kind]:
            raise ValueError(f"--devices: {d} is not available on this host ({found[kind]} {kind} device(s) found)")
    return [d for d in devices for _ in range(workers_per_device)]


def _canonical(device: str) -> str:
    """cuda -> cuda:0, npu -> npu:0 (so duplicates are found whichever way they are written)."""
    return device if device == "cpu" or ":" in device else f"{device}:0"


def cpu_threads_per_worker(devices: list[str], configured: int = 0, cpus: int | None = None) -> dict[int, int]:
    """Torch threads of each worker: --cpu-threads, else OMP_NUM_THREADS, else the usable CPUs split
    between CPU workers. The frontend gets no reserved core: measured on 2 cores, its event loop
    idles while the model computes, and the worker's second thread is worth more (see README,
    Performance)."""
    cpus = usable_cpus() if cpus is None else cpus
    omp = os.environ.get("OMP_NUM_THREADS", "")
    cpu_workers = [i for i, d in enumerate(devices) if d == "cpu"]
    if configured > 0:
        share = configured
    elif omp.isdigit() and int(omp) > 0:
        share = int(omp)
    else:
        share = max(1, cpus // max(1, len(cpu_workers)))
    # Accelerator workers only feed their device: a couple of threads is plenty.
    return {i: (share if d == "cpu" else min(4, cpus)) for i, d in enumerate(devices)}
