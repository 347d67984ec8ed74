"""Shared fixtures: one real server on the fixture checkpoint for the API tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import TINY_MODEL, ServerProcess

# Limits small enough that the bad-input tests can cross them cheaply.
API_SERVER_ARGS = [
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
