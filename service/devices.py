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


def resolve_devices(spec: str) -> list[str]:
    """'auto' -> all CUDA GPUs, else all NPUs, else one CPU; otherwise the comma-separated list."""
    spec = spec.strip()
    if spec == "auto":
        if n := _cuda_count():
            return [f"cuda:{i}" for i in range(n)]
        if n := _npu_count():
            return [f"npu:{i}" for i in range(n)]
        return ["cpu"]
    problems = device_syntax_problems(spec)
    if problems:
        raise ValueError("; ".join(problems))
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    found: dict[str, int] = {}  # accelerator kind -> devices on this host, probed once
    for d in devices:
        kind, _, index = d.partition(":")
        if kind == "cpu":
            continue
        if kind not in found:
            found[kind] = _cuda_count() if kind == "cuda" else _npu_count()
        if int(index or 0) >= found[kind]:
            raise ValueError(f"--devices: {d} is not available on this host ({found[kind]} {kind} device(s) found)")
    return devices


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
