"""Images -> model inputs, equal to the original Phi-3.5-vision ``Phi3VImageProcessor``.

The pipeline (tests/fixtures/README.md, section 2.1) is reproduced step by step with Pillow, numpy and
torch, using the same primitives as the original so that ``pixel_values`` come out bit for bit equal:
Pillow's BILINEAR resize for the HD image (what torchvision's ``resize`` calls on a PIL image) and
``torch.nn.functional.interpolate`` bicubic (no antialias) for the global view.

EXIF orientation policy: the original processor ignores the EXIF ``Orientation`` tag and works on the
pixels in their stored order. To stay equal to it, :func:`decode_image` does the same by default; callers
that prefer the visually upright image pass ``apply_exif_orientation=True`` (``ImageOps.exif_transpose``),
knowing that the model then sees different pixels (and, for 90-degree tags, a different token count)
than the original pipeline would.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

CROP_SIZE = 336
TOKENS_PER_CROP = 144
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_NUM_CROPS = 16
# 12x12 merged patches per crop: one separator ("newline") token closes each of the 12 rows.
_ROWS_PER_CROP = 12

# Formats a client may send. An allowlist keeps Pillow away from plugins that shell out (EPS runs
# Ghostscript) or parse rarely exercised formats from untrusted bytes. (Phone MPO files open via "JPEG".)
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can use; the message says why."""


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


# Pixel decodes done by this process. Observability only: the metrics prove where decoding happens
# (the preprocessing pool) and where it never does (the model workers).
_decodes = 0


def decode_count() -> int:
    """Images this process has decoded so far."""
    return _decodes


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("image data is empty")
    try:
        return Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (a process-wide setting we leave alone) fired before ours could.
        raise ImageDecodeError(f"image has too many pixels (limit {max_pixels}): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "unsupported or unrecognised image format (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from None
    except Exception as exc:  # Pillow raises many types on malformed headers; all mean bad input.
        raise ImageDecodeError(f"corrupt image header: {exc}") from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image has too many pixels: {width}x{height} = {width * height} pixels, limit {max_pixels}"
        )


def probe_image(data: bytes, max_pixels: int) -> ImageHeader:
    """Format and size from the header alone (no pixel is decoded): cheap enough for the event loop.
    The decoded image always has this size (no EXIF transpose, no draft mode), so token counts
    computed from it are exact."""
    img = _open(data, max_pixels)
    width, height = img.size
    _check_pixels(width, height, max_pixels)
    return ImageHeader(str(img.format), width, height)


def decode_image(data: bytes, max_pixels: int, *, apply_exif_orientation: bool = False) -> Image.Image:
    """Decode encoded image bytes into a fully loaded RGB image.

    The pixel count from the header is checked against ``max_pixels`` before any pixel data is decoded,
    so a small file that expands to a huge bitmap (a decompression bomb) costs nothing. The whole image is
    then decoded (``load()``), so truncated or corrupt files fail here rather than later in a worker.
    Colour conversion is Pillow's ``convert("RGB")`` as in the original (transformers 4.43): alpha is
    dropped without compositing, palette images go through their palette, grey is replicated, CMYK uses
    Pillow's conversion.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    img = _open(data, max_pixels)
    _check_pixels(*img.size, max_pixels)
    global _decodes
    _decodes += 1
    try:
        img.load()
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, zlib errors, ...
        raise ImageDecodeError(f"corrupt or truncated {img.format} image: {exc}") from None

    try:
        if apply_exif_orientation:
            img = ImageOps.exif_transpose(img)
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as exc:  # exotic modes (e.g. LAB) or a broken EXIF block
        raise ImageDecodeError(f"cannot convert {img.format} image in mode {img.mode} to RGB: {exc}") from None


def _check_num_crops(num_crops: int) -> None:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or not 1 <= num_crops <= MAX_NUM_CROPS:
        raise ValueError(f"num_crops must be an integer in 1..{MAX_NUM_CROPS}, got {num_crops!r}")


def _landscape_resize_size(long_side: int, short_side: int, num_crops: int) -> tuple[int, int]:
    """(new_w, new_h) of the HD resize for a landscape (or square) image, exactly as the original.

    Float64 ratio, the ``scale`` search and the truncating ``int(new_w / ratio)`` are kept in this form
    on purpose: the exact integer form ``new_w * short // long`` differs for some sizes (a 9x7 image at
    scale 3 gives 783 here but 784 exactly), and the original's token counts follow the float form.
    """
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * CROP_SIZE
    new_h = int(new_w / ratio)
    if new_h < 1:
        # The original would crash in the resize; say why instead.
        raise ValueError(
            f"image aspect ratio {long_side}:{short_side} is too extreme for num_crops={num_crops}"
            " (the resized short side would be 0 pixels)"
        )
    return new_w, new_h


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def hd_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(H, W) of the padded HD image, multiples of 336, computed from the input size alone."""
    _check_num_crops(num_crops)
    _check_size(width, height)
    new_w, new_h = _landscape_resize_size(max(width, height), min(width, height), num_crops)
    padded_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    # Portrait images were transposed to landscape, so their padded size is transposed back.
    return (padded_h, new_w) if width >= height else (new_w, padded_h)


def _grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    hd_h, hd_w = hd_image_size(width, height, num_crops)
    return hd_h // CROP_SIZE, hd_w // CROP_SIZE


def tokens_for_grid(h: int, w: int) -> int:
    """Image tokens of an h x w crop grid: h*w sub-crops + the global view (144 each), 1 separator,
    and a newline per merged row (12 per crop row, h + 1 rows with the global view's)."""
    return (h * w + 1) * TOKENS_PER_CROP + 1 + (h + 1) * _ROWS_PER_CROP


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Image tokens in the prompt for an image of this size."""
    return tokens_for_grid(*_grid(width, height, num_crops))


def num_image_tiles(width: int, height: int, num_crops: int) -> int:
    """336-px crops the vision tower runs for an image of this size: the global view + h*w."""
    h, w = _grid(width, height, num_crops)
    return 1 + h * w


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # float32 (1 + h*w, 3, 336, 336): [global, sub-crops row-major]; no padding crops
    image_size: tuple[int, int]  # (H, W) of the padded HD image
    num_tokens: int


def _hd_uint8(image: Image.Image, num_crops: int) -> np.ndarray:
    """The padded HD image as a (H, W, 3) uint8 array."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    _check_size(width, height)
    portrait = width < height
    if portrait:
        # Resize the transposed image, as the original: Pillow resizes in two passes with rounding in
        # between, so resizing the portrait image with swapped sizes differs by 1 in ~9% of the values.
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = _landscape_resize_size(image.width, image.height, num_crops)
    if image.size != (new_w, new_h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    top = int((target_h - new_h) / 2)
    hd = np.full((target_h, new_w, 3), 255, dtype=np.uint8)  # white padding, top and bottom only
    hd[top : top + new_h] = np.asarray(image, dtype=np.uint8)
    # Pillow's TRANSPOSE swaps x and y, which is a swap of the first two array axes.
    return hd.transpose(1, 0, 2) if portrait else hd


def preprocess_image(image: Image.Image, num_crops: int) -> ProcessedImage:
    """HD transform, normalisation, global view and 336x336 crops of one image (no zero padding crops)."""
    _check_num_crops(num_crops)
    hd_u8 = _hd_uint8(image, num_crops)
    height, width = hd_u8.shape[:2]
    # torchvision ToTensor + Normalize, op for op (uint8 -> float32, /255, -mean, /std) for bit equality.
    hd = torch.from_numpy(np.ascontiguousarray(hd_u8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    hd.sub_(torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1))
    hd.div_(torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1))
    # The global view is taken from the normalised HD tensor, bicubic without antialias, as the original.
    global_view = torch.nn.functional.interpolate(
        hd.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False
    )
    h, w = height // CROP_SIZE, width // CROP_SIZE
    crops = (
        hd.reshape(3, h, CROP_SIZE, w, CROP_SIZE)
        .permute(1, 3, 0, 2, 4)  # (h, w, 3, 336, 336): row-major tiles
        .reshape(h * w, 3, CROP_SIZE, CROP_SIZE)
    )
    pixel_values = torch.cat([global_view, crops], dim=0).contiguous()
    num_tokens = tokens_for_grid(h, w)
    return ProcessedImage(pixel_values=pixel_values, image_size=(height, width), num_tokens=num_tokens)
