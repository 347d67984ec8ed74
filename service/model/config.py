"""The Phi-3.5-vision `config.json`, parsed and checked once at start-up.

Everything the model code needs is read here, so an unsupported checkpoint fails with one clear
error before any weight is touched, never with a shape error deep inside a forward pass.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The real checkpoint carries no tower description: the original code hard-codes CLIP ViT-L/14-336.
CLIP_VIT_L_14_336: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

SUPPORTED_ROPE_TYPES = ("su", "longrope")


class ModelConfigError(ValueError):
    """config.json describes a model this code cannot serve; the message names the key."""


@dataclass(frozen=True)
class VisionConfig:
    clip: dict[str, Any]
    image_dim_out: int

    @property
    def num_layers(self) -> int:
        return int(self.clip["num_hidden_layers"])


@dataclass(frozen=True)
class ModelConfig:
    model_id: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_short_factor: tuple[float, ...]
    rope_long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    max_position_embeddings: int
    eos_token_id: int
    vision: VisionConfig

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_attention_factor(self) -> float:
        # LongRoPE scales cos and sin by this for every position, short and long factors alike.
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ModelConfigError(f"config.json: missing key {key!r}")
    return cfg[key]


def _check_equal(cfg: dict[str, Any], key: str, expected: Any, where: str = "config.json") -> None:
    value = cfg.get(key, expected)
    if value != expected:
        raise ModelConfigError(f"{where}: {key}={value!r} is not supported (expected {expected!r})")


def parse_model_config(cfg: dict[str, Any], model_id: str = "") -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type != "phi3_v":
        raise ModelConfigError(
            f"config.json: model_type={model_type!r} is not supported; VisionChat serves phi3_v "
            "(microsoft/Phi-3.5-vision-instruct)"
        )
    _check_equal(cfg, "hidden_act", "silu")
    _check_equal(cfg, "tie_word_embeddings", False)  # lm_head is its own tensor in every Phi-3.5-vision

    embd = cfg.get("embd_layer") or {}
    for key, expected in (
        ("embedding_cls", "image"),
        ("hd_transform_order", "sub_glb"),
        ("projection_cls", "mlp"),
        ("use_hd_transform", True),
        ("with_learnable_separator", True),
    ):
        _check_equal(embd, key, expected, where="config.json embd_layer")

    rope = _require(cfg, "rope_scaling") or {}
    rope_type = rope.get("type", rope.get("rope_type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(f"config.json: rope_scaling.type={rope_type!r} is not supported {SUPPORTED_ROPE_TYPES}")

    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    if hidden % heads:
        raise ModelConfigError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = hidden // heads
    short = tuple(float(x) for x in _require(rope, "short_factor"))
    long = tuple(float(x) for x in _require(rope, "long_factor"))
    for name, factors in (("short_factor", short), ("long_factor", long)):
        if len(factors) != head_dim // 2:
            raise ModelConfigError(
                f"config.json: rope_scaling.{name} has {len(factors)} entries, head_dim {head_dim} needs "
                f"{head_dim // 2}"
            )

    img = _require(cfg, "img_processor")
    clip = dict(img.get("vision_config") or CLIP_VIT_L_14_336)
    if clip.get("image_size", 336) != 336 or clip.get("patch_size", 14) != 14:
        raise ModelConfigError("config.json: img_processor.vision_config must keep image_size 336 and patch_size 14")
    image_dim_out = int(img.get("image_dim_out", clip["hidden_size"]))
    if image_dim_out != int(clip["hidden_size"]):
        raise ModelConfigError(
            f"config.json: img_processor.image_dim_out {image_dim_out} != vision tower hidden_size "
            f"{clip['hidden_size']}"
        )
    num_img_tokens = int(img.get("num_img_tokens", 144))
    if num_img_tokens != 144:
        raise ModelConfigError(f"config.json: img_processor.num_img_tokens={num_img_tokens} is not supported (144)")

    return ModelConfig(
        model_id=model_id or str(cfg.get("_name_or_path") or "phi3_v"),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size")),
        num_layers=int(_require(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        vocab_size=int(_require(cfg, "vocab_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_short_factor=short,
        rope_long_factor=long,
        original_max_position_embeddings=int(_require(cfg, "original_max_position_embeddings")),
        max_position_embeddings=int(_require(cfg, "max_position_embeddings")),
        eos_token_id=int(cfg.get("eos_token_id", 2)),
        vision=VisionConfig(clip=clip, image_dim_out=image_dim_out),
    )


def load_model_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: missing (not a Hugging Face model folder?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: invalid JSON: {exc}") from exc
    return parse_model_config(cfg, model_id=str(cfg.get("_name_or_path") or Path(model_dir).name))
