"""Synthetic requests a worker runs on itself: the warm-up, and the steps that set its memory peak."""

from __future__ import annotations

import time

from PIL import Image

from ..engine import EngineConfig, EngineRequest, SamplingOptions
from ..engine.pixels import TensorPixels
from ..engine.request import ImageInput
from ..engine.sequence import image_content_key
from ..processor.image import preprocess_image

# <s><|user|>\n ... \n<|end|>\n<|assistant|> around a prompt's own tokens.
_HEAD = (1, 32010)
_TAIL = (13, 32007, 29871, 13, 32001)
_FILLER = 29871


def synthetic_image(width: int, height: int, num_crops: int) -> ImageInput:
    """A generated image (nothing decoded), preprocessed in this process."""
    processed = preprocess_image(Image.new("RGB", (width, height), (120, 30, 200)), num_crops)
    tiles = processed.pixel_values
    key = image_content_key(f"synthetic-{width}x{height}".encode(), num_crops)
    return ImageInput(key, processed.num_tokens, int(tiles.shape[0]), processed.image_size, TensorPixels(tiles))


def _request(
    request_id: str, body: tuple[int, ...], images: tuple[ImageInput, ...], eos: int, new: int
) -> EngineRequest:
    options = SamplingOptions(max_new_tokens=new, eos_token_ids=frozenset({eos}))
    return EngineRequest(request_id, (*_HEAD, *body, *_TAIL), images, options, time.time())


def warmup_request(eos_token_id: int, capacity_tokens: int, text_tokens: int = 8) -> EngineRequest:
    """A short text request through the decoder and the sampler, fitting whatever the limits allow."""
    n = max(1, min(text_tokens, capacity_tokens - len(_HEAD) - len(_TAIL) - 3))
    return _request("__warmup__", (_FILLER,) * n, (), eos_token_id, 2)


def profile_requests(config: EngineConfig, eos_token_id: int) -> list[EngineRequest]:
    """The steps that set a worker's memory peak, within its own limits: the largest prefill chunk
    (--max-num-batched-tokens tokens) holding the largest image (num_crops 16: 17 tiles, through
    vision micro-batches of --max-vision-crops), and a decode batch of --max-num-seqs sequences.
    Long contexts add nothing to the peak: attention gathers at most its workspace, which the
    profile reserves whole."""
    room = min(config.max_num_batched_tokens, config.max_model_len - 2) - len(_HEAD) - len(_TAIL)
    image = synthetic_image(1344, 1344, 16)
    images: tuple[ImageInput, ...] = ()
    body: tuple[int, ...] = ()
    if image.num_tokens + 1 <= min(room, config.max_image_embed_tokens):
        images, body = (image,), (*([-1] * image.num_tokens), 1)
    body = (*body, *([_FILLER] * max(1, room - len(body))))
    requests = [_request("__profile_prefill__", body, images, eos_token_id, 1)]
    decodes = range(config.max_num_seqs - 1)
    requests += [_request(f"__profile_decode_{i}__", (_FILLER,), (), eos_token_id, 2) for i in decodes]
    return requests
