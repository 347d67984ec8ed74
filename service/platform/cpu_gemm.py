"""The CPU matmul path of every Linear: torch's dense GEMM or oneDNN with a prepacked weight.

`F.linear` on CPU calls MKL's sgemm for fp32, which is near peak for large row counts on some CPUs
and 2-3x slower than oneDNN with a prepacked (blocked) weight on others, and for the few-row GEMMs
of decode steps almost everywhere. Which is faster depends on the CPU, the dtype and the shape, so
the choice is measured on this machine, once per weight shape and role, at start-up: each
candidate runs on the real weight at the row count its role sees (the decode batch, the vision
micro-batch, the image projector's rows), and the faster one is kept. One representation per
weight: a second copy would double the model's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

DENSE = "dense"
ONEDNN = "onednn"
# The packed path must win by this margin; a tie keeps the plain weight (and mmap sharing).
MARGIN = 0.95


class PackedLinear(nn.Module):
    """nn.Linear whose weight oneDNN reordered once into its blocked layout (what vLLM-CPU and
    inductor's weight prepacking do); the same result up to float rounding."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn prepacked"


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


def measure(linear: nn.Linear, rows: int, rounds: int = 5) -> tuple[float, float | None]:
    """Seconds per call of (dense, onednn prepacked) on this weight with `rows` input rows.

    The two run alternately and each keeps its best time: start-up is when other processes are
    busy too, and alternating exposes both candidates to the same interference."""
    x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
    with torch.inference_mode():
        dense_fn = lambda: torch.nn.functional.linear(x, linear.weight, linear.bias)  # noqa: E731
        try:
            packed = PackedLinear(linear, rows)
        except RuntimeError:  # e.g. bf16 reorders need AVX-512 on this oneDNN
            dense_fn()
            return min(_once(dense_fn) for _ in range(rounds)), None
        dense_fn(), packed(x)  # first calls pay one-off set-up (primitive creation, page faults)
        dense = onednn = float("inf")
        for _ in range(rounds):
            dense = min(dense, _once(dense_fn))
            onednn = min(onednn, _once(lambda: packed(x)))
        return dense, onednn


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
    policy: str = "auto",
    measure_fn: Callable[[nn.Linear, int], tuple[float, float | None]] = measure,
) -> list[GemmChoice]:
    """Give every Linear of `model` its GEMM path. policy: auto (measure), dense, onednn.

    Decisions are made once per (role, weight shape) and applied to every Linear that shares them."""
    decided: dict[tuple[str, tuple[int, int]], GemmChoice] = {}
    for parent, attr, linear, name in list(_linears(model)):
        role = role_of(name)
        shape = (linear.out_features, linear.in_features)
        rows = rows_of_role[role]
        choice = decided.get((role, shape))
        if choice is None:
            if policy == "auto":
                dense_s, onednn_s = measure_fn(linear, rows)
                choice = GemmChoice(role, shape, rows, decide(dense_s, onednn_s), dense_s * 1e3, None if onednn_s is None else onednn_s * 1e3)
            else:
                choice = GemmChoice(role, shape, rows, policy, float("nan"), None)
            decided[(role, shape)] = choice
        if choice.path == ONEDNN:
            setattr(parent, attr, PackedLinear(linear, rows))
    return list(decided.values())
