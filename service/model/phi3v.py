"""Phi-3.5-vision for serving: embeddings, image rows, decoder stack, lm_head on a flattened batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .decoder import Phi3DecoderLayer, RMSNorm
from .rope import LongRoPE
from .vision import ImageEmbedder


@dataclass
class StepInputs:
    """One engine step, flattened over its sequences (decode tokens first, then prefill chunks)."""

    input_ids: torch.Tensor  # (T,) int64; image positions may hold anything (they are overwritten)
    positions: torch.Tensor  # (T,) int64
    use_long_rope: torch.Tensor  # (T,) bool: the token's sequence is longer than the original context
    image_token_index: torch.Tensor  # (I,) int64: flat positions that take image embedding rows
    image_embeds: torch.Tensor | None  # (I, hidden): rows for those positions, in order
    attention: AttentionMetadata
    logits_index: torch.Tensor  # (S,) int64: flat positions whose next-token logits are wanted


class Phi3VBackbone(nn.Module):
    """The `model.` prefix of the checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = ImageEmbedder(config)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3VForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3VBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = LongRoPE(config)

    @property
    def vision(self) -> ImageEmbedder:
        return self.model.vision_embed_tokens

    # Read from a norm weight: the platform may swap the Linears for modules with packed weights.
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def hidden_states(self, step: StepInputs, kv_caches: list[torch.Tensor], backend: AttentionBackend) -> torch.Tensor:
        """Final-norm hidden states of every token in the step, (T, hidden)."""
        x = self.model.embed_tokens(step.input_ids.clamp(0, self.config.vocab_size - 1))
        if step.image_embeds is not None and step.image_token_index.numel():
            x = x.index_copy(0, step.image_token_index, step.image_embeds.to(x.dtype))
        cos, sin = self.rope.cos_sin(step.positions, step.use_long_rope, x.dtype)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, cache, step.attention, backend)
        return self.model.norm(x)

    def forward(self, step: StepInputs, kv_caches: list[torch.Tensor], backend: AttentionBackend) -> torch.Tensor:
        """Logits (S, vocab) in float32 at `step.logits_index`; lm_head runs only on those rows."""
        hidden = self.hidden_states(step, kv_caches, backend)
        return self.lm_head(hidden[step.logits_index]).float()
