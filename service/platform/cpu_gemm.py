"""The CPU matmul path of every Linear: torch's dense GEMM or oneDNN with a prepacked weight, on one
thread or on all of the worker's threads.

`F.linear` on CPU calls MKL's sgemm for fp32, which is near peak for large row counts on some CPUs
and 2-3x slower than oneDNN with a prepacked (blocked) weight on others, and for the few-row GEMMs
of decode steps almost everywhere. Which is faster depends on the CPU, the dtype and the shape, so
the choice is measured on this machine, once per weight shape and role, at start-up: each candidate
runs on the real weight at the row count its role sees (the decode batch, the vision micro-batch,
the image projector's rows), and the faster one is kept. One representation per weight: a second
copy would double the model's memory.

Threads: a worker runs on one thread by default (its per-token work is many small ops, and a second
spinning thread would take the core the frontend needs); a GEMM big enough to gain from more
threads (the lm_head of a decode batch, prefill chunks, the vision tower) takes all of the worker's
threads for its duration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DENSE = "dense"
ONEDNN = "onednn"
# The packed path must win by this margin; a tie keeps the plain weight (and mmap sharing).
MARGIN = 0.95
# When a GEMM runs on all the worker's threads (measured on 2 cores, threads sleeping between
# regions): from 16M multiply-adds (a 64 x 256 x 1024 GEMM gains 1.1x, 16 x 256 x 1024 loses 1.4x
# to waking the second thread), or whatever the rows for a weight of 2M elements or more, whose
# reading alone takes long enough (the lm_head of one sequence gains 1.9x).
WIDE_MACS = 16_000_000
WIDE_WEIGHT = 2_000_000


@dataclass
class Threads:
    """The worker's thread counts: `narrow` for most ops, `wide` for work big enough to share."""

    narrow: int = 1
    wide: int = 1

    @contextmanager
    def widened(self, wide: bool = True) -> Iterator[None]:
        if not wide or torch.get_num_threads() == self.wide:  # narrow work, or already inside wide work
            yield
            return
        torch.set_num_threads(self.wide)
        try:
            yield
        finally:
            torch.set_num_threads(self.narrow)


class WideAbove(nn.Module):
    """Runs `inner` on all the worker's threads when its input has at least `min_rows` rows (a
    prefill chunk through a decoder layer, crops through the vision tower): its attention and
    elementwise ops then share the threads too, not only its GEMMs."""

    def __init__(self, inner: nn.Module, min_rows: int, threads: Threads) -> None:
        super().__init__()
        self.inner = inner
        self.min_rows = min_rows
        self.threads = threads

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        with self.threads.widened(x.numel() // x.shape[-1] >= self.min_rows if x.dim() > 1 else True):
            return self.inner(*args, **kwargs)


class CpuLinear(nn.Module):
    """nn.Linear on the CPU: the weight dense or prepacked by oneDNN (what vLLM-CPU and inductor's
    weight prepacking do; the same result up to float rounding), on one thread or all of them."""

    def __init__(self, linear: nn.Linear, packed: bool, rows_hint: int, threads: Threads) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = packed
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint) if packed else linear.weight
        )
        self.bias = linear.bias
        self.threads = threads

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.in_features * self.out_features
        with self.threads.widened(weight >= WIDE_WEIGHT or x.numel() * self.out_features >= WIDE_MACS):
            return self._mm(x)

    def extra_repr(self) -> str:
        path = "onednn prepacked" if self.packed else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, {path}"


@dataclass(frozen=True)
class GemmChoice:
    role: str  # decoder | lm_head | vision | projector
    shape: tuple[int, int]  # (out, in)
    rows: int  # M it was measured at
    path: str  # dense | onednn
    dense_ms: float
    onednn_ms: float | None  # None: the packed path is not available for this dtype on this CPU


def _once(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(linear: nn.Linear, rows: int, threads: Threads, rounds: int = 5) -> tuple[float, float | None]:
    """Seconds per call of (dense, onednn prepacked) on this weight with `rows` input rows, on the
    threads that call would run on in service.

    The two run alternately and each keeps its best time: start-up is when other processes are
    busy too, and alternating exposes both candidates to the same interference."""
    x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
    with torch.inference_mode():
        dense = CpuLinear(linear, False, rows, threads)
        try:
            packed = CpuLinear(linear, True, rows, threads)
        except RuntimeError:  # e.g. bf16 reorders need AVX-512 on this oneDNN
            dense(x)
            return min(_once(lambda: dense(x)) for _ in range(rounds)), None
        dense(x), packed(x)  # first calls pay one-off set-up (primitive creation, page faults)
        dense_s = packed_s = float("inf")
        for _ in range(rounds):
            dense_s = min(dense_s, _once(lambda: dense(x)))
            packed_s = min(packed_s, _once(lambda: packed(x)))
            if max(dense_s, packed_s) > 0.05 and abs(dense_s - packed_s) > 0.2 * min(dense_s, packed_s):
                break  # a big GEMM with a clear winner: more rounds would only cost start-up time
        return dense_s, packed_s


def decide(dense_s: float, onednn_s: float | None) -> str:
    return ONEDNN if onednn_s is not None and onednn_s < MARGIN * dense_s else DENSE


def _linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, linear, qualified name) for every nn.Linear below `module`."""
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Linear):
            yield module, name, child, qualified
        else:
            yield from _linears(child, qualified + ".")


def apply_gemm_paths(
    model: nn.Module,
    role_of: Callable[[str], str],
    rows_of_role: dict[str, int],
    threads: Threads,
    policy: str = "auto",
    measure_fn: Callable[[nn.Linear, int, Threads], tuple[float, float | None]] = measure,
) -> list[GemmChoice]:
    """Replace every nn.Linear of `model` with a CpuLinear. policy: auto (measure), dense, onednn.

    Decisions are made once per (role, weight shape) and applied to every Linear that shares them."""
    decided: dict[tuple[str, tuple[int, int]], GemmChoice] = {}
    for parent, attr, linear, name in list(_linears(model)):
        role = role_of(name)
        shape = (linear.out_features, linear.in_features)
        rows = rows_of_role[role]
        choice = decided.get((role, shape))
        if choice is None:
            if policy == "auto":
                dense_s, onednn_s = measure_fn(linear, rows, threads)
                choice = GemmChoice(
                    role,
                    shape,
                    rows,
                    decide(dense_s, onednn_s),
                    dense_s * 1e3,
                    None if onednn_s is None else onednn_s * 1e3,
                )
            else:
                choice = GemmChoice(role, shape, rows, policy, float("nan"), None)
            decided[(role, shape)] = choice
        setattr(parent, attr, CpuLinear(linear, choice.path == ONEDNN, rows, threads))
    return list(decided.values())
