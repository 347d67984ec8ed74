"""Platform decisions that can be checked on this machine: usable CPUs from affinity and cgroup
quotas, worker thread counts, the CPU dtype, the GEMM path of every Linear (and parity under each),
vision work per step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import image
from harness import GOLDEN, TINY_MODEL

from service.devices import cpu_threads_per_worker
from service.engine import Engine, EngineConfig, EngineRequest, SamplingOptions
from service.model import load_model, select_attention_backend
from service.platform.cpu import CpuPlatform, linear_role, native_bf16
from service.platform.cpu_cores import cgroup_cpu_limit, usable_cpus
from service.platform.cpu_gemm import CpuLinear, Threads, apply_gemm_paths, decide

CPU = torch.device("cpu")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- usable CPUs ------------------------------------------------------------------------------------


def test_cgroup_v2_quota_anywhere_up_the_path(tmp_path: Path) -> None:
    write(tmp_path / "kubepods" / "cpu.max", "1600000 100000\n")  # 16 CPUs for the pods' parent
    write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000\n")  # no limit of its own
    write(tmp_path / "kubepods" / "pod1" / "ctr" / "cpu.max", "250000 100000\n")  # 2.5 CPUs
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1/ctr\n") == 2.5
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 16.0
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert usable_cpus(tmp_path, "0::/kubepods/pod1/ctr\n") == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")  # half a CPU
    write(tmp_path / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    cgroup = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n"
    assert cgroup_cpu_limit(tmp_path, cgroup) == 0.5
    assert usable_cpus(tmp_path, cgroup) == 1  # never less than one
    assert cgroup_cpu_limit(tmp_path, "12:cpu,cpuacct:/\n") is None  # -1: unlimited


def test_worker_threads_from_flag_environment_or_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads_per_worker(["cpu"], cpus=16) == {0: 16}
    assert cpu_threads_per_worker(["cpu", "cpu"], cpus=16) == {0: 8, 1: 8}
    assert cpu_threads_per_worker(["cpu", "cpu", "cpu"], cpus=2) == {0: 1, 1: 1, 2: 1}
    assert cpu_threads_per_worker(["cuda:0", "cpu"], cpus=16) == {0: 4, 1: 16}
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the CPU overlay's setting is honoured
    assert cpu_threads_per_worker(["cpu"], cpus=96) == {0: 6}
    assert cpu_threads_per_worker(["cpu"], configured=3, cpus=96) == {0: 3}  # the flag wins


# --- dtype, vision work -------------------------------------------------------------------------------


def test_cpu_dtype_follows_native_bf16() -> None:
    assert not native_bf16({"avx2", "avx512f", "avx512bw"})
    assert CpuPlatform(CPU, flags={"avx2", "fma"}).default_dtype() == torch.float32
    assert CpuPlatform(CPU, flags={"avx512f", "avx512_bf16"}).default_dtype() == torch.bfloat16
    assert CpuPlatform(CPU, flags={"amx_bf16", "amx_tile"}).default_dtype() == torch.bfloat16
    assert CpuPlatform(CPU, flags=set()).resolve_dtype("float32") == torch.float32


def test_vision_tiles_per_step_from_the_measured_tile_time() -> None:
    platform = CpuPlatform(CPU, flags=set())
    assert platform.vision_tiles_per_step(0) == 1  # nothing measured yet
    platform.measured_tile_seconds(2.5)  # a full-size tower on two cores
    assert platform.vision_tiles_per_step(0) == 1
    platform.measured_tile_seconds(0.01)
    assert platform.vision_tiles_per_step(0) == 25
    assert platform.vision_tiles_per_step(7) == 7  # the flag wins


# --- GEMM paths -------------------------------------------------------------------------------------


def test_gemm_decision_needs_a_clear_win() -> None:
    assert decide(10.0, 5.0) == "onednn"
    assert decide(10.0, 9.7) == "dense"  # within the margin: keep the plain weight
    assert decide(10.0, None) == "dense"  # no packed path for this dtype on this CPU


def test_linear_roles() -> None:
    assert linear_role("lm_head") == "lm_head"
    assert linear_role("model.layers.0.self_attn.qkv_proj") == "decoder"
    assert linear_role("model.vision_embed_tokens.img_projection.0") == "projector"
    assert linear_role("model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1") == "vision"


def test_measured_choices_apply_per_role_and_shape() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
    seen: list[tuple[int, int]] = []

    def measure(linear: torch.nn.Linear, rows: int, threads: Threads) -> tuple[float, float | None]:
        seen.append((linear.out_features, rows))
        return (1.0, 0.5) if linear.out_features == 16 else (1.0, 2.0)

    choices = apply_gemm_paths(model, lambda name: "decoder", {"decoder": 4}, Threads(), "auto", measure)
    assert seen == [(16, 4), (8, 4)]  # once per shape, the third Linear reuses the first's decision
    assert [c.path for c in choices] == ["onednn", "dense"]
    assert [type(m) for m in model] == [CpuLinear] * 3
    assert [m.packed for m in model] == [True, False, True]
    x = torch.randn(3, 8)
    assert model(x).shape == (3, 16)


def test_threads_widen_only_for_big_work_and_nest() -> None:
    threads = Threads(narrow=1, wide=2)
    torch.set_num_threads(1)
    with threads.widened():
        assert torch.get_num_threads() == 2
        with threads.widened():  # inside wide work: stays wide, and the outer one restores
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with threads.widened(False):
        assert torch.get_num_threads() == 1


def _golden_case(name: str) -> tuple[EngineRequest, list[int]]:
    index = json.loads((GOLDEN / "index.json").read_text())["model"][name]
    with np.load(GOLDEN / f"model_{name}.npz") as z:
        ids = tuple(int(t) for t in z["input_ids"][0])
        tokens = z["gen_tokens"].tolist()
    images = tuple(image((GOLDEN / "images" / f"{n}.png").read_bytes(), index["num_crops"]) for n in index.get("images") or [])
    return EngineRequest(name, ids, images, SamplingOptions(max_new_tokens=16), time.time()), tokens


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("policy", ["onednn", "dense", "auto"])
def test_golden_tokens_on_every_gemm_path(policy: str) -> None:
    model, _ = load_model(TINY_MODEL, torch.float32, CPU, progress=False)
    platform = CpuPlatform(CPU)
    platform.configure_process(2)
    choices = platform.prepare_model(model, {"decoder": 16, "lm_head": 16, "vision": 577, "projector": 1024}, policy)
    if policy != "auto":
        assert {c.path for c in choices} == {policy}
    assert isinstance(model.lm_head, CpuLinear)
    engine = Engine(model, EngineConfig(max_model_len=4096, kv_cache_memory_bytes=32 << 20), select_attention_backend("auto", CPU))
    cases = [_golden_case(n) for n in ("text_only", "nc4_one_B_1024x300", "nc4_two_A_B")]
    out = engine.run_to_completion([req for req, _ in cases])
    for req, tokens in cases:
        assert out[req.request_id] == tokens, (policy, req.request_id)
    torch.set_num_threads(1)
