"""Encoded image bytes (or a decoded video frame) -> an engine ImageInput: HD transform, crops stored
for the worker."""

from __future__ import annotations

from PIL import Image

from ..engine.pixels import PixelFile, TensorPixels
from ..engine.request import ImageInput
from ..engine.sequence import image_content_key
from ..processor.image import decode_image, preprocess_image


def image_input(data: bytes, num_crops: int, max_pixels: int, pixel_path: str | None = None) -> ImageInput:
    """The image as the engine takes it. With `pixel_path` the crops go to that shared-memory file
    (the serving path); without, they stay in this process (tests, warm-up, library use)."""
    return pil_image_input(decode_image(data, max_pixels), image_content_key(data, num_crops), num_crops, pixel_path)


def pil_image_input(image: Image.Image, key: bytes, num_crops: int, pixel_path: str | None = None) -> ImageInput:
    processed = preprocess_image(image, num_crops)
    tiles = processed.pixel_values
    pixels = PixelFile.write(pixel_path, tiles) if pixel_path else TensorPixels(tiles)
    return ImageInput(
        key=key,
        num_tokens=processed.num_tokens,
        num_tiles=int(tiles.shape[0]),
        image_size=processed.image_size,
        pixels=pixels,
    )
