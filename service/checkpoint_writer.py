"""Write a random-weight Phi-3.5-vision checkpoint in the real Hugging Face layout.

No weights can be downloaded where VisionChat is built and tested, so tests, the embedded default
model and the full-size load benchmark use checkpoints generated here. They must exercise the same
loader path as `microsoft/Phi-3.5-vision-instruct`, so the layout copies `save_pretrained`:

* `config.json`; `model-0000N-of-0000M.safetensors` shards filled in `state_dict` order, a new shard
  starting when the next tensor would not fit (one shard: a single `model.safetensors`, no index);
* `model.safetensors.index.json` with sorted keys and `metadata.total_size` = sum of tensor bytes;
* tensor names exactly as the original `state_dict` after `save_pretrained`: every CLIP encoder layer
  (including the last one, which VisionChat never computes) and `post_layernorm`, but no
  `model.vision_embed_tokens.wte.weight` alias.

Names and shapes come from the serving model itself, built on the meta device, so the writer cannot
drift from what the loader expects. Each tensor is drawn from its own generator seeded from
(seed, tensor name), and streamed straight into its shard file: memory stays at one tensor, which is
what lets a full-size 4.2B-parameter checkpoint be written on a small machine, and the files are
byte-identical for the same seed whatever the sharding or the order of generation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from .model.config import parse_model_config
from .model.phi3v import Phi3VForCausalLM
from .model.vision import CHECKPOINT_TOWER, checkpoint_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype tags, and the names config.json uses for `torch_dtype`.
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_CONFIG_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}

_ENCODER_LAYER = re.compile(re.escape(CHECKPOINT_TOWER) + r"encoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def checkpoint_tensors(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the original checkpoint, in the original `state_dict` order.

    The serving model holds all of them except the vision tower's last encoder layer (it only needs
    `hidden_states[-2]`); that layer is rebuilt here from the names and shapes of layer 0 and placed
    where the original has it: after the other encoder layers, before `post_layernorm`.
    """
    model_config = parse_model_config(config)
    with torch.device("meta"):
        model = Phi3VForCausalLM(model_config)
    specs = [TensorSpec(checkpoint_name(n), tuple(p.shape)) for n, p in model.named_parameters()]

    last = model_config.vision.num_layers - 1
    layer0 = [(m.group(2), s.shape) for s in specs if (m := _ENCODER_LAYER.match(s.name)) and m.group(1) == "0"]
    if not layer0:
        raise ValueError("checkpoint writer: the vision tower needs at least 2 layers to derive the last one")
    last_layer = [TensorSpec(f"{CHECKPOINT_TOWER}encoder.layers.{last}.{suffix}", shape) for suffix, shape in layer0]
    insert_at = max(i for i, s in enumerate(specs) if _ENCODER_LAYER.match(s.name)) + 1
    return specs[:insert_at] + last_layer + specs[insert_at:]


def _init(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor, following the fixture's initialisation (tests/fixtures/README.md 1.3).

    The scales are larger than the usual 0.02 so that attention is far from uniform: greedy text from
    these weights varies with the prompt and the image, which is what the tests need to see.
    """
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0.0, 0.3
    if name.startswith("model.layers.") or name == "model.norm.weight":
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return 1.0, 0.1
        return 0.0, 0.12  # decoder Linear weights (qkv, o, gate_up, down)
    if name in ("model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN"):
        return 0.0, 1.0
    if name.startswith("model.vision_embed_tokens.img_projection."):
        return (0.0, 0.05) if name.endswith(".bias") else (0.0, 1.0 / math.sqrt(shape[1]))
    if name.startswith(CHECKPOINT_TOWER):
        local = name[len(CHECKPOINT_TOWER) :]
        if "layrnorm" in local or "layernorm" in local or "layer_norm" in local:
            return (0.0, 0.1) if local.endswith(".bias") else (1.0, 0.1)
        if local.endswith(".bias"):
            return 0.0, 0.05
        if local == "embeddings.patch_embedding.weight":
            return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))  # fan_in = 3 * 14 * 14
        if local in ("embeddings.class_embedding", "embeddings.position_embedding.weight"):
            return 0.0, 0.5
        if local.endswith(".weight") and len(shape) == 2:
            return 0.0, 1.0 / math.sqrt(shape[1])  # Linear: fan_in
    # A new parameter in the model must get an explicit rule here, not a silent default.
    raise ValueError(f"checkpoint writer: no initialisation rule for tensor {name!r} {list(shape)}")


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype, pad_token_id: int) -> torch.Tensor:
    """The tensor `spec` of the checkpoint with this seed (independent of every other tensor)."""
    mean, std = _init(spec.name, spec.shape)
    gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, spec.name))
    t = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    t.mul_(std).add_(mean)
    if spec.name == "model.embed_tokens.weight" and 0 <= pad_token_id < spec.shape[0]:
        t[pad_token_id] = 0.0  # nn.Embedding(padding_idx=...) keeps the pad row at zero
    return t.to(dtype)


def plan_shards(specs: list[TensorSpec], element_size: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """`save_pretrained`'s split: state_dict order, a new shard when the next tensor would not fit
    (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * element_size
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _safetensors_header(specs: list[TensorSpec], dtype: torch.dtype) -> tuple[bytes, list[TensorSpec]]:
    """The header as the safetensors library writes it: tensors laid out sorted by name (one dtype),
    compact JSON, padded with spaces to a multiple of 8 bytes. Returns it and the data order."""
    element_size = torch.empty((), dtype=dtype).element_size()
    ordered = sorted(specs, key=lambda s: s.name)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in ordered:
        end = offset + spec.numel * element_size
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return raw, ordered


def _write_shard(
    path: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, pad_token_id: int, bar: tqdm | None
) -> None:
    header, ordered = _safetensors_header(specs, dtype)
    # Written beside and renamed over: the loader maps shards into memory (on CPU the weights stay
    # views of the file), and truncating a mapped file in place would crash a running server with
    # SIGBUS; a rename gives the new shard a new inode and leaves the old mapping intact.
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in ordered:
            _write_tensor(f, random_tensor(spec, seed, dtype, pad_token_id))
            if bar is not None:
                bar.update(spec.numel * dtype.itemsize)
    os.replace(partial, path)


def _write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    # Raw little-endian bytes, exactly what safetensors stores; numpy has no bf16, so view as uint8.
    f.write(tensor.contiguous().view(torch.uint8).numpy().data)


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def iter_shard_files(out_dir: Path) -> Iterator[Path]:
    yield from sorted(out_dir.glob("model*.safetensors"))


def write_random_checkpoint(
    out_dir: str | os.PathLike[str],
    config: dict[str, Any],
    *,
    seed: int,
    max_shard_bytes: int,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
) -> Path:
    """Write config.json and random weights for `config` into `out_dir` (created if needed).

    Same config, seed, shard limit and dtype => byte-identical files. `config["torch_dtype"]` is set to
    the dtype written, as save_pretrained does. Returns the folder.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"checkpoint writer: dtype {dtype} is not supported ({', '.join(_CONFIG_DTYPES.values())})")
    if max_shard_bytes <= 0:
        raise ValueError(f"checkpoint writer: max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config["torch_dtype"] = _CONFIG_DTYPES[dtype]
    specs = checkpoint_tensors(config)
    pad = config.get("pad_token_id")
    pad_token_id = -1 if pad is None else int(pad)

    element_size = dtype.itemsize
    shards = plan_shards(specs, element_size, max_shard_bytes)
    total = sum(s.numel for s in specs) * element_size
    names = [SINGLE_FILE] if len(shards) == 1 else [_shard_name(i, len(shards)) for i in range(len(shards))]

    # Stale shards from an earlier write with another split would make the folder ambiguous.
    for stale in iter_shard_files(out):
        if stale.name not in names:
            stale.unlink()
    if len(shards) == 1 and (out / INDEX_FILE).exists():
        (out / INDEX_FILE).unlink()

    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress) as bar:
        for name, shard in zip(names, shards, strict=True):
            _write_shard(out / name, shard, seed, dtype, pad_token_id, bar)

    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard},
        }
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
