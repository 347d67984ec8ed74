"""Phi-3.5-vision written for serving: loader, vision tower, paged-attention decoder."""

from .attention import AttentionMetadata, PrefillSpan, select_attention_backend
from .config import ModelConfig, ModelConfigError, load_model_config
from .loader import CheckpointError, load_model, resolve_dtype
from .phi3v import Phi3VForCausalLM, StepInputs

__all__ = [
    "AttentionMetadata",
    "CheckpointError",
    "ModelConfig",
    "ModelConfigError",
    "Phi3VForCausalLM",
    "PrefillSpan",
    "StepInputs",
    "load_model",
    "load_model_config",
    "resolve_dtype",
    "select_attention_backend",
]
