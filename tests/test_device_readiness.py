"""What the first GPU or NPU run needs, checked on the CPU: out-of-memory errors become preemptions,
the dtype follows real capability, duplicate devices are refused, the memory profile covers the
biggest steps, and the KV budget respects both the device share and the memory actually free."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from harness import TINY_MODEL

from service.devices import resolve_devices
from service.engine import Engine, EngineConfig, EngineRequest, SamplingOptions
from service.model import select_attention_backend
from service.platform.base import MemoryInfo, Platform
from service.platform.cuda import CudaPlatform
from service.platform.npu import npu_has_bf16
from service.worker.kv_budget import kv_budget
from service.worker.probes import profile_requests

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _text(rid: str, length: int, new: int = 12) -> EngineRequest:
    gen = torch.Generator().manual_seed(length)
    ids = [1] + torch.randint(100, 32000, (length - 1,), generator=gen).tolist()
    return EngineRequest(rid, tuple(ids), (), SamplingOptions(max_new_tokens=new), time.time())


def test_out_of_memory_in_a_step_preempts_and_keeps_the_tokens(model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    requests = [_text(f"r{n}", n) for n in (30, 60, 90, 120)]
    config = EngineConfig(max_model_len=1024, kv_cache_memory_bytes=16 << 20)
    alone = Engine(model, config, select_attention_backend("auto", CPU)).run_to_completion(requests)

    # A device that cannot hold a forward of more than two sequences' tokens at once: the allocator
    # fails inside the step, as CUDA or CANN would, with the sequences' state untouched.
    engine = Engine(model, config, select_attention_backend("auto", CPU))
    execute = engine.runner.execute
    failures = []

    def tight_memory(plan, embeds, partial):  # type: ignore[no-untyped-def]
        if sum(1 for c in plan.chunks if c.num_tokens) > 2:
            failures.append(len(plan.chunks))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return execute(plan, embeds, partial)

    monkeypatch.setattr(engine.runner, "execute", tight_memory)
    out = engine.run_to_completion(requests)
    assert out == alone
    assert failures and engine.num_oom_preemptions >= len(failures)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_out_of_memory_with_one_sequence_fails_only_that_request(model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(model, EngineConfig(max_model_len=1024, kv_cache_memory_bytes=16 << 20), select_attention_backend("auto", CPU))
    monkeypatch.setattr(engine.runner, "execute", lambda *a: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    engine.add_request(_text("big", 50))
    (out,) = engine.step().outputs
    assert out.finish_reason.value == "error" and "out of device memory" in (out.error or "")
    assert not engine.has_work() and engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_other_errors_are_not_mistaken_for_out_of_memory() -> None:
    platform = Platform(CPU)
    assert platform.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert platform.is_out_of_memory(RuntimeError("NPU out of memory. Tried to allocate"))
    assert not platform.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not platform.is_out_of_memory(ValueError("out of memory"))  # not from the allocator


@pytest.mark.parametrize(("capability", "native", "dtype"), [((8, 0), True, torch.bfloat16), ((9, 0), True, torch.bfloat16), ((7, 5), False, torch.float16), ((7, 0), False, torch.float16)])
def test_cuda_dtype_from_real_capability(monkeypatch, capability, native, dtype) -> None:  # type: ignore[no-untyped-def]
    calls = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return native or including_emulation  # a V100/T4 emulates bf16 and says so unless asked

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert CudaPlatform(torch.device("cuda", 0)).default_dtype() == dtype
    assert calls == [False]


def test_npu_bf16_by_chip() -> None:
    assert npu_has_bf16("Ascend910B2") and npu_has_bf16("Ascend910_9392")
    assert not npu_has_bf16("Ascend910ProB") and not npu_has_bf16("Ascend910A") and not npu_has_bf16("Ascend310P3")


def test_duplicate_devices_are_refused_and_workers_per_device_shares_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import service.devices as devices

    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)
    with pytest.raises(ValueError, match=r"lists cuda:0 2 times.*--workers-per-device 2"):
        resolve_devices("cuda:0,cuda:0")
    with pytest.raises(ValueError, match="lists cuda:0 2 times"):
        resolve_devices("cuda,cuda:0")  # the same device, written two ways
    assert resolve_devices("cuda:0,cuda:1", workers_per_device=2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert resolve_devices("cpu,cpu") == ["cpu", "cpu"]  # CPU workers split cores, not memory


def test_workers_sharing_a_device_split_its_memory_fraction() -> None:
    from service.config import parse_config
    from service.server import worker_settings

    config, _ = parse_config(["--kv-cache-fraction", "0.8"])
    settings = worker_settings(config, TINY_MODEL, ["cuda:0", "cuda:0", "cuda:1"], 4096)
    assert [s.kv_cache_fraction for s in settings] == pytest.approx([0.4, 0.4, 0.8])


def test_profile_covers_the_biggest_steps_within_the_limits() -> None:
    config = EngineConfig(max_model_len=8192, kv_cache_memory_bytes=0, max_num_batched_tokens=3000, max_num_seqs=48, max_vision_crops=8)
    requests = profile_requests(config, eos_token_id=32000)
    prefill = requests[0]
    assert len(prefill.prompt_ids) == config.max_num_batched_tokens  # one full-size prefill chunk
    assert prefill.images and prefill.images[0].num_tiles == 17  # the largest image, > one micro-batch
    assert len(requests) == config.max_num_seqs  # with the others: a decode batch of max_num_seqs
    small = EngineConfig(max_model_len=512, kv_cache_memory_bytes=0, max_num_batched_tokens=256, max_num_seqs=4)
    small_requests = profile_requests(small, eos_token_id=32000)
    assert all(len(r.prompt_ids) + r.sampling.max_new_tokens <= small.max_model_len for r in small_requests)
    assert not small_requests[0].images  # the image does not fit a 256-token step: left out


@dataclass
class FakeDevice(Platform):
    """The memory facts of an accelerator, for the budget arithmetic (the model runs on the CPU)."""

    total: int = 16 << 30
    free_after_load: int = 10 << 30
    peak: int = 0
    allocated: int = 0

    def __post_init__(self) -> None:
        super().__init__(CPU)

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(self.free_after_load, self.total)

    def reset_peak(self) -> None:
        self.peak = 0

    def peak_bytes(self) -> int:
        return self.peak

    def allocated_bytes(self) -> int:
        return self.allocated


def test_kv_budget_takes_the_smaller_of_share_and_free_memory(model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import service.worker.kv_budget as budget_module

    config = EngineConfig(max_model_len=2048, kv_cache_memory_bytes=0, max_num_batched_tokens=512, max_num_seqs=8)
    device = FakeDevice(allocated=6 << 30)
    ran: list[int] = []

    def profile(config, model, backend, platform):  # type: ignore[no-untyped-def]
        ran.append(len(profile_requests(config, model.config.eos_token_id)))
        return 7 << 30  # weights (6 GiB) + the biggest step's activations and workspace (1 GiB)

    monkeypatch.setattr(budget_module, "profile_peak", profile)
    backend = select_attention_backend("auto", CPU)
    # A whole device of 16 GiB at 0.9: 14.4 - 7 = 7.4 GiB by share; free 10 GiB - 1 GiB transient - margin.
    got = kv_budget(config, 0.9, model, backend, device)
    margin = max(budget_module.MARGIN_MIN_BYTES, int(device.total * budget_module.MARGIN_FRACTION))
    assert got == min(int(16 * 0.9 * (1 << 30)) - (7 << 30), (10 << 30) - (1 << 30) - margin)
    # Two workers on the device: half the share each.
    assert kv_budget(config, 0.45, model, backend, device) == int(16 * 0.45 * (1 << 30)) - (7 << 30)
    # Too little left: one clear error naming what to change.
    with pytest.raises(ValueError, match="no room for a KV pool.*--kv-cache-fraction"):
        kv_budget(config, 0.4, model, backend, device)
    assert ran == [8, 8, 8]
    assert kv_budget(EngineConfig(max_model_len=2048, kv_cache_memory_bytes=123 << 20), 0.9, model, backend, device) == 123 << 20


def test_profile_run_executes_the_decode_batch_and_reserves_the_workspace(model) -> None:  # type: ignore[no-untyped-def]
    from service.worker.kv_budget import profile_peak

    config = EngineConfig(max_model_len=1024, kv_cache_memory_bytes=0, max_num_batched_tokens=256, max_num_seqs=6, max_vision_crops=4)
    backend = select_attention_backend("auto", CPU, workspace_bytes=1 << 20)
    profile_peak(config, model, backend, Platform(CPU))
    assert backend._workspace is not None and backend._workspace.numel() * 4 == 1 << 20  # reserved whole


def test_device_check_dry_run_on_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`make device-check` is what the first accelerator session runs: its parts must work before then."""
    import json
    import subprocess
    import sys

    out = tmp_path / "report.json"
    checks = "environment,bf16,attention,memory"
    cmd = [sys.executable, "tools/device_check.py", "--device", "cpu", "--quick", "--only", checks, "--out", str(out)]
    run = subprocess.run(cmd, cwd=TINY_MODEL.parents[2], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["attention"]["sequences"] == 64 and report["attention"]["longest"] == 16384
    assert report["attention"]["max_abs_diff"] < 1e-4  # the same kernel on both sides here
    assert 0 < report["bf16"]["token_agreement"] <= 1
    assert "skipped" in report["memory"]  # no device memory on the CPU
