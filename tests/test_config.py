"""Configuration: flags, environment twins, byte sizes, and the README table kept true."""

from __future__ import annotations

import pytest
from harness import ROOT

from service.config import OPTIONS, config_table, parse_bytes, parse_config


def test_readme_configuration_table_equals_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end].strip() == config_table()


def test_environment_twins_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONCHAT_KV_CACHE_MEMORY", "2GiB")
    monkeypatch.setenv("VISIONCHAT_MAX_IMAGES", "7")
    config, _ = parse_config(["--max-images", "9"])
    assert config.kv_cache_memory == 2 << 30
    assert config.max_images == 9  # a flag wins over its environment twin
    assert {o.env for o in OPTIONS} == {"VISIONCHAT_" + o.dest.upper() for o in OPTIONS}


@pytest.mark.parametrize(("text", "value"), [("512MiB", 512 << 20), ("1.5G", 3 << 29), ("1000", 1000), ("4k", 4096)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_invalid_configuration_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--block-size", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["configuration error: --block-size must be >= 1"]


@pytest.mark.parametrize("spec", ["tpu:0", "cuda:x", "cuda:0", "npu:3", ""])
def test_devices_that_do_not_exist_here_are_refused_up_front(spec: str) -> None:
    import torch

    from service.devices import resolve_devices

    if spec == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    with pytest.raises(ValueError, match="--devices"):
        resolve_devices(spec)


def test_devices_auto_and_cpu_lists() -> None:
    from service.devices import cpu_threads_per_worker, resolve_devices

    assert resolve_devices("cpu, cpu") == ["cpu", "cpu"]
    # Two CPU workers share the cores left after the frontend's, at least one thread each.
    threads = cpu_threads_per_worker(["cpu", "cpu"])
    assert set(threads) == {0, 1} and all(t >= 1 for t in threads.values())
