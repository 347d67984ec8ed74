"""Shared fixtures: one real server on the fixture checkpoint for the API tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from harness import TEST_DEVICE, TINY_MODEL, ServerProcess

from service.model import Phi3VForCausalLM, load_model, select_attention_backend
from service.model.attention import AttentionBackend
from service.platform import platform_for

# Limits small enough that the bad-input tests can cross them cheaply.
API_SERVER_ARGS = [
    "--dtype", "float32",  # the golden tokens are fp32 results, whatever this CPU computes natively
    "--model", str(TINY_MODEL),
    "--max-images", "4",
    "--max-image-bytes", "8MiB",
    "--max-total-image-bytes", "12MiB",
    "--max-context-tokens", "4096",
    "--max-new-tokens", "4096",
    "--kv-cache-memory", "64MiB",
]


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(API_SERVER_ARGS).start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _pool_back_to_all_free(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that used the shared server leaves its KV pool with all blocks free."""
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For in-process model tests. The tiny model's ops are too small for intra-op threads to pay
    off, and on a busy 2-core machine a second thread spin-waits behind other processes (a
    one-token-chunk prefill went from 0.9 s to 18 s under load). One thread keeps runtimes predictable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> Phi3VForCausalLM:
    """The fixture checkpoint in float32 on the test device (VISIONCHAT_TEST_DEVICE, default the CPU),
    for in-process model and engine tests. An accelerator gets its platform's set-up first (on CUDA:
    TF32 off); the CPU keeps the test process's thread count, which the CPU platform would narrow to 1."""
    if TEST_DEVICE != "cpu":
        platform_for(TEST_DEVICE).configure_process(torch.get_num_threads())
    m, _ = load_model(TINY_MODEL, torch.float32, torch.device(TEST_DEVICE), progress=False)
    return m


@pytest.fixture(scope="module")
def backend() -> AttentionBackend:
    return select_attention_backend("auto", torch.device(TEST_DEVICE))
