"""LongRoPE ("su") rotary embeddings of Phi-3, with the factor set chosen per token.

The original picks short or long factors per forward pass from the key length. Here a flattened batch
mixes sequences, so the caller passes one flag per token (`use_long`): the engine derives it from each
sequence's own length, which keeps a sequence's result independent of its batch neighbours and of how
its prefill was chunked. The arithmetic follows the original step for step (float32 inverse
frequencies, outer product, cos/sin of the concatenated halves, times the attention factor), which
is why this is written out here rather than taken from transformers, whose rope helpers pick one
factor set for the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


class LongRoPE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.head_dim
        # Explicit CPU device: the model is built under torch.device("meta"), and these are not weights.
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        base = config.rope_theta**exponent
        short = 1.0 / (torch.tensor(config.rope_short_factor, dtype=torch.float32, device="cpu") * base)
        long = 1.0 / (torch.tensor(config.rope_long_factor, dtype=torch.float32, device="cpu") * base)
        # Row 0 short, row 1 long: a per-token index selects the set without branching.
        self.register_buffer("inv_freq", torch.stack([short, long]), persistent=False)
        self.inv_freq: torch.Tensor
        self.attention_factor = config.rope_attention_factor

    def cos_sin(
        self, positions: torch.Tensor, use_long: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, head_dim) for token positions (T,) and long-factor flags (T,)."""
        inv_freq = self.inv_freq[use_long.long()]  # (T, dim/2)
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos/sin: (T, head_dim)."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return x * cos + rotate_half(x) * sin
