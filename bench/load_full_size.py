"""Load time and peak host memory of a checkpoint with the real Phi-3.5-vision dimensions.

No real weights can be downloaded here, so this writes (once) a random-weight checkpoint with the
real sizes: hidden 3072, intermediate 8192, 32 layers, 32 heads, vocab 32064, CLIP ViT-L/14-336
(no `vision_config`, as in the real config.json), bf16, split into 5 GB shards like save_pretrained
(~8.3 GB on disk). Then a fresh Python process loads it with `load_model`, reads one element of
every 4 KiB page of every weight (what the first forward would fault in), and reports the wall times
and its peak RSS (ru_maxrss) against the size of the weights, as one JSON line.

    python bench/load_full_size.py [--dir /tmp/visionchat-full-random] [--dtype bfloat16] [--cold]

The loader builds the model on the meta device and fills it tensor by tensor, so the peak should
stay near one copy of the weights; this measures that it does. By default the page cache is warm
(the checkpoint was just written or read); `--cold` evicts the shard files from it first, so the
first touch reads from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURE_CONFIG = ROOT / "tests" / "fixtures" / "tiny-phi35v" / "config.json"
DEFAULT_DIR = Path("/tmp/visionchat-full-random")
SEED = 0
MAX_SHARD_BYTES = 5_000_000_000  # save_pretrained's default "5GB"
DISK_MARGIN = 1 << 30
TOKENIZER_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def full_size_config() -> dict[str, Any]:
    """The real Phi-3.5-vision-instruct config.json: the fixture's (same rope factors, tokens, layout)
    with the real sizes and without the fixture-only `vision_config`."""
    cfg = json.loads(FIXTURE_CONFIG.read_text())
    cfg.update(
        _name_or_path="Phi-3.5-vision-instruct-full-size-random",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    )
    img = {k: v for k, v in cfg["img_processor"].items() if k != "vision_config"}
    img["image_dim_out"] = 1024
    cfg["img_processor"] = img
    return cfg


def weights_bytes(folder: Path) -> int:
    return int(json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"])


def ensure_checkpoint(folder: Path) -> tuple[bool, float]:
    """Write the checkpoint unless a complete one is there. Returns (written now, seconds)."""
    import torch

    from service.checkpoint_writer import INDEX_FILE, checkpoint_tensors, write_random_checkpoint

    if (folder / INDEX_FILE).is_file():
        return False, 0.0
    cfg = full_size_config()
    need = sum(s.numel for s in checkpoint_tensors(cfg)) * 2
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < need + DISK_MARGIN:
        raise SystemExit(
            f"{folder.parent}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB + 1 GB margin"
        )
    # Written beside the target and renamed: an interrupted run never leaves a folder that looks complete.
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    write_random_checkpoint(
        tmp, cfg, seed=SEED, max_shard_bytes=MAX_SHARD_BYTES, dtype=torch.bfloat16, progress=sys.stderr.isatty()
    )
    # The tokenizer and processor files too, so the folder can also be served (`--model`).
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE_CONFIG.parent / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return True, time.perf_counter() - start


def _rss_kib() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes; this bench targets the Linux servers).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def evict_from_page_cache(folder: Path) -> None:
    """Drop this checkpoint's cached pages (only these files; other processes' cache is untouched)."""
    for shard in folder.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss_breakdown() -> dict[str, int]:
    """Current RSS split into anonymous memory and file-backed (mapped checkpoint) pages, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def touch_every_page(model: Any) -> None:
    """Read one element per 4 KiB page of every weight: what the first forward pass would fault in."""
    import torch

    with torch.inference_mode():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            flat[:: max(1, 4096 // p.element_size())].sum()


def measure(folder: Path, dtype_name: str) -> dict[str, Any]:
    """Runs in the fresh child process: import, load, fault every weight page in, report."""
    import torch

    from service.model import load_model, resolve_dtype

    device = torch.device("cpu")
    dtype = resolve_dtype(dtype_name, device)
    before = _rss_kib() * 1024  # interpreter + torch + transformers, before any weight is read
    start = time.perf_counter()
    model, report = load_model(folder, dtype, device, progress=False)
    load_seconds = time.perf_counter() - start
    peak_after_load = _rss_kib() * 1024
    after_load = _rss_breakdown()
    # safetensors hands out CPU tensors that are views of its memory map when no cast is needed, so
    # load_model may return before reading the data; the first forward then pays the reads.
    start = time.perf_counter()
    touch_every_page(model)
    touch_seconds = time.perf_counter() - start
    peak = _rss_kib() * 1024
    after_touch = _rss_breakdown()
    on_disk = weights_bytes(folder)
    return {
        "bench": "load_full_size",
        "dir": str(folder),
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "num_parameters_loaded": sum(p.numel() for p in model.parameters()),  # without the unused CLIP layer
        "checkpoint_weights_bytes": on_disk,
        "loaded_weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "load_seconds": round(load_seconds, 2),
        "loader_reported_seconds": round(report.seconds, 2),
        "first_touch_seconds": round(touch_seconds, 2),
        "load_plus_touch_gb_per_s": round(on_disk / (load_seconds + touch_seconds) / 1e9, 2),
        "rss_before_load_bytes": before,
        "peak_rss_after_load_bytes": peak_after_load,
        "rss_after_load": after_load,
        "peak_rss_bytes": peak,
        "rss_after_touch": after_touch,
        "peak_rss_over_weights": round(peak / on_disk, 3),
        "peak_rss_minus_baseline_over_weights": round((peak - before) / on_disk, 3),
        "weights_mapped_from_file": after_touch.get("RssFile", 0) > on_disk // 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="checkpoint folder (written once)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype to load into (default bfloat16)")
    parser.add_argument(
        "--cold", action="store_true", help="evict the shard files from the page cache first (posix_fadvise)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.dir, args.dtype)))
        return

    written, write_seconds = ensure_checkpoint(args.dir)
    if args.cold:
        evict_from_page_cache(args.dir)
    # A fresh interpreter, so the peak RSS is the loader's alone, not the writer's.
    child = subprocess.run(
        [sys.executable, __file__, "--child", "--dir", str(args.dir), "--dtype", args.dtype],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["page_cache"] = "cold" if args.cold else "warm"
    result["checkpoint_written_now"] = written
    if written:
        result["write_seconds"] = round(write_seconds, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
