"""In-process engine helpers shared by the model and engine tests (no server)."""

from __future__ import annotations

import torch

from service.engine import Engine, EngineRequest, ImageInput
from service.engine.kv_cache import blocks_needed
from service.engine.scheduler import ScheduledChunk
from service.engine.sequence import Sequence
from service.preprocess.images import image_input

MAX_PIXELS = 1 << 31


def image(data: bytes, num_crops: int) -> ImageInput:
    """An image as the engine takes it, preprocessed in this process."""
    return image_input(data, num_crops, MAX_PIXELS)


@torch.inference_mode()
def embeddings(engine: Engine, images: tuple[ImageInput, ...]) -> dict[bytes, torch.Tensor]:
    vision = engine.model.vision
    device = engine.model.device
    return {
        img.key: vision.embed_tiles(vision.crop_features(img.pixels.read(0, img.num_tiles).to(device), 16), img.image_size)
        for img in images
    }


@torch.inference_mode()
def prompt_forward(engine: Engine, request: EngineRequest, force_short: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, vocab) float32 logits and (L, hidden) final hidden states at every position of the request's
    prompt, from one fresh forward (no cache reuse) through the engine's own step building."""
    model = engine.model
    seq = Sequence(request, model.config.original_max_position_embeddings)
    n = seq.num_tokens
    seq.block_ids = engine.pool.allocate(blocks_needed(n, engine.config.block_size))
    try:
        step, _ = engine.runner.build_step([ScheduledChunk(seq, n)], embeddings(engine, request.images))
        if force_short:
            step.use_long_rope = torch.zeros_like(step.use_long_rope)
        hidden = model.hidden_states(step, engine.kv_cache.layers, engine.runner.backend)
        logits = model.lm_head(hidden).float()
    finally:
        engine.pool.free(seq.block_ids)
    return logits.cpu(), hidden.cpu()  # compared with golden values on the host
