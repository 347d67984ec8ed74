"""Image embedding of Phi-3.5-vision: CLIP tower, 2x2 merge, separators, MLP projector.

The tower is transformers' CLIPVisionModel built with one layer fewer than the checkpoint's: the
original takes `hidden_states[-2]`, which is exactly the last hidden state of the truncated tower,
so the unused top layer is never computed (the loader skips its weights). Crops run through the
tower in micro-batches so that a request with many frames never needs one giant forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import ModelConfig

GRID = 24  # 336 / 14 patches per side
MERGED = GRID // 2


TOWER = "model.vision_embed_tokens.img_processor."
CHECKPOINT_TOWER = TOWER + "vision_model."


def unused_vision_tensor_prefixes(config: ModelConfig) -> tuple[str, ...]:
    """Checkpoint tensors that the truncated tower does not hold."""
    last = config.vision.num_layers - 1
    return (f"{CHECKPOINT_TOWER}encoder.layers.{last}.",)


def checkpoint_name(param_name: str) -> str:
    """The checkpoint's name for a parameter: transformers 5 flattened CLIPVisionModel's `vision_model.`."""
    if param_name.startswith(TOWER) and not param_name.startswith(CHECKPOINT_TOWER):
        return CHECKPOINT_TOWER + param_name[len(TOWER) :]
    return param_name


class ImageEmbedder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        clip = dict(config.vision.clip)
        clip["num_hidden_layers"] = config.vision.num_layers - 1
        clip_config = CLIPVisionConfig(**clip)
        clip_config._attn_implementation = "sdpa"
        self.img_processor = CLIPVisionModel(clip_config)
        c = config.vision.image_dim_out
        self.glb_GN = nn.Parameter(torch.empty(1, 1, 4 * c))
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, 4 * c))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * c, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def materialize_buffers(self, device: torch.device) -> None:
        """Recreate the tower's non-persistent buffers, which a meta-device build leaves empty."""
        tower = getattr(self.img_processor, "vision_model", self.img_processor)
        emb = tower.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))

    def crop_features(self, crops: torch.Tensor, max_crops_per_batch: int) -> torch.Tensor:
        """(N, 3, 336, 336) -> (N, 576, C): second-to-last CLIP layer without the CLS token."""
        dtype = self.glb_GN.dtype
        outs = [
            self.img_processor(pixel_values=batch.to(dtype)).last_hidden_state[:, 1:]
            for batch in crops.split(max_crops_per_batch)
        ]
        return torch.cat(outs)

    def _merge_2x2(self, feats: torch.Tensor) -> torch.Tensor:
        """(n, 576, C) -> (n, 12, 12, 4C), channel blocks ordered (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1)."""
        n, _, c = feats.shape
        return feats.reshape(n, MERGED, 2, MERGED, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, MERGED, MERGED, 4 * c)

    def _with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        rows = grid.shape[0]
        return torch.cat([grid, self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1)], dim=1).reshape(-1, grid.shape[-1])

    def layout(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image's crop features [global, sub-crops...] -> its sequence of 4C-wide rows ("sub_glb")."""
        h, w = image_size[0] // 336, image_size[1] // 336
        merged = self._merge_2x2(feats)
        sub = merged[1:].reshape(h, w, MERGED, MERGED, -1).permute(0, 2, 1, 3, 4).reshape(h * MERGED, w * MERGED, -1)
        return torch.cat(
            [self._with_row_separators(sub), self.glb_GN.reshape(1, -1), self._with_row_separators(merged[0])]
        )

    def embed_tiles(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image's tile features (from `crop_features`, possibly computed over several steps)
        -> its embedding rows (image tokens, hidden)."""
        return self.img_projection(self.layout(feats, image_size))

    def forward(
        self,
        pixel_values: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        max_crops_per_batch: int,
    ) -> torch.Tensor:
        """Embeddings for the images in order, concatenated: (sum of image tokens, hidden)."""
        counts = [p.shape[0] for p in pixel_values]
        feats = self.crop_features(torch.cat(list(pixel_values)), max_crops_per_batch)
        return torch.cat([self.embed_tiles(f, size) for f, size in zip(feats.split(counts), image_sizes, strict=True)])
