"""Load a Phi-3.5-vision checkpoint in the Hugging Face layout, without running any of its code.

The model is built on the meta device (no random initialisation, no memory), then every tensor is
read from its safetensors shard, cast to the compute dtype, moved to the device and assigned in
place, one at a time. Peak host memory therefore stays near one copy of the weights. Everything is
checked against the model's own parameter list before the first byte is read, so a broken folder
fails at start-up with the file and tensor named.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from .config import ModelConfig, load_model_config
from .phi3v import Phi3VForCausalLM
from .vision import checkpoint_name, unused_vision_tensor_prefixes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# The original model shares `embed_tokens` with the image embedder; save_pretrained drops the alias,
# but a checkpoint that kept it is just as valid.
ALIASES = ("model.vision_embed_tokens.wte.weight",)


class CheckpointError(ValueError):
    """The model folder cannot be served; the message names the file (and tensor)."""


@dataclass(frozen=True)
class LoadReport:
    seconds: float
    num_tensors: int
    bytes_on_disk: int


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs without bf16 matrix units run fp32 faster; accelerators serve in bf16 as the weights are stored.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise CheckpointError(f"--dtype {name!r} is not supported; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def checkpoint_weight_map(model_dir: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index or the single-file layout."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with _open_shard(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE} (weights missing)")


def _open_shard(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc


def _is_skipped(name: str, skipped_prefixes: tuple[str, ...]) -> bool:
    return name in ALIASES or name.startswith(skipped_prefixes)


@dataclass(frozen=True)
class CheckpointPlan:
    config: ModelConfig
    weight_map: dict[str, Path]  # checkpoint tensor name -> shard
    expected: dict[str, tuple[str, torch.Size]]  # checkpoint tensor name -> (parameter name, shape)


def inspect_checkpoint(model_dir: str | os.PathLike[str]) -> CheckpointPlan:
    """Check config, shard files, tensor names and shapes from the headers alone (no tensor data read).

    The server runs this before starting workers, so a broken folder is one error at start-up."""
    root = Path(model_dir)
    config = load_model_config(root)
    weight_map = checkpoint_weight_map(root)
    with torch.device("meta"):
        meta_model = Phi3VForCausalLM(config)
    expected = {checkpoint_name(name): (name, p.shape) for name, p in meta_model.named_parameters()}
    skipped = unused_vision_tensor_prefixes(config)
    for name, shard in sorted(weight_map.items()):
        if name not in expected and not _is_skipped(name, skipped):
            raise CheckpointError(f"{shard}: unknown tensor {name!r} (not part of a phi3_v model)")
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise CheckpointError(f"{root}: tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")
    for shard in sorted(set(weight_map[name] for name in expected)):
        with _open_shard(shard) as f:
            stored = set(f.keys())
            for name in (n for n in expected if weight_map[n] == shard):
                if name not in stored:
                    raise CheckpointError(
                        f"{shard}: tensor {name!r} is listed in the index but not stored in this file"
                    )
                shape = tuple(f.get_slice(name).get_shape())
                want = tuple(expected[name][1])
                if shape != want:
                    raise CheckpointError(
                        f"{shard}: tensor {name!r} has shape {list(shape)}, the config needs {list(want)}"
                    )
    return CheckpointPlan(config, weight_map, expected)


def load_model(
    model_dir: str | os.PathLike[str],
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
) -> tuple[Phi3VForCausalLM, LoadReport]:
    start = time.perf_counter()
    plan = inspect_checkpoint(model_dir)
    with torch.device("meta"):
        model = Phi3VForCausalLM(plan.config)

    by_shard: dict[Path, list[str]] = {}
    for name in plan.expected:
        by_shard.setdefault(plan.weight_map[name], []).append(name)
    tqdm.monitor_interval = 0  # no monitor thread left behind in the worker process
    for shard in tqdm(sorted(by_shard), desc="loading shards", unit="shard", disable=not progress):
        with _open_shard(shard) as f:
            for name in by_shard[shard]:
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"{shard}: cannot read tensor {name!r} ({exc})") from exc
                param = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
                _assign(model, plan.expected[name][0], param)

    model.rope.to(device)
    model.vision.materialize_buffers(device)
    model.eval()
    report = LoadReport(
        seconds=time.perf_counter() - start,
        num_tensors=len(plan.expected),
        bytes_on_disk=sum(p.stat().st_size for p in set(plan.weight_map.values())),
    )
    return model, report


def _assign(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, value)
