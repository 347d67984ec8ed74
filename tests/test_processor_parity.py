"""Image processor parity with the original Phi3VImageProcessor (golden outputs), and image decoding."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.processor import (
    CROP_SIZE,
    ImageDecodeError,
    decode_image,
    hd_image_size,
    num_image_tokens,
    preprocess_image,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
BIG = 100_000_000  # a max_pixels that no test image reaches
PIXEL_TOLERANCE = 1e-5  # README 4.1 for the same resize primitives; observed: 0.0 (bit-exact)

GOLDEN_CASES = [(4, "A_640x480"), (4, "B_1024x300"), (4, "C_200x900"), (16, "A_640x480")]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def golden_npz() -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for nc in (4, 16):
        with np.load(GOLDEN / f"processor_nc{nc}.npz") as z:
            out[nc] = {k: z[k] for k in z.files}
    return out


@pytest.mark.parametrize(("num_crops", "name"), GOLDEN_CASES)
def test_pixel_values_match_golden(num_crops: int, name: str, golden_npz) -> None:
    golden = golden_npz[num_crops]
    image = decode_image((GOLDEN / "images" / f"{name}.png").read_bytes(), BIG)
    processed = preprocess_image(image, num_crops)

    pv = processed.pixel_values
    assert pv.dtype == torch.float32
    h, w = processed.image_size[0] // CROP_SIZE, processed.image_size[1] // CROP_SIZE
    assert pv.shape == (1 + h * w, 3, CROP_SIZE, CROP_SIZE)
    # The original pads with all-zero crops up to num_crops + 1; we leave that to the batcher.
    padded = torch.cat([pv, pv.new_zeros(num_crops + 1 - pv.shape[0], 3, CROP_SIZE, CROP_SIZE)])
    expected = torch.from_numpy(golden[f"{name}.pixel_values"][0])
    max_diff = (padded - expected).abs().max().item()
    assert max_diff <= PIXEL_TOLERANCE, f"{name} nc{num_crops}: max |diff| {max_diff}"

    assert list(processed.image_size) == golden[f"{name}.image_sizes"][0].tolist()
    assert processed.num_tokens == int(golden[f"{name}.num_img_tokens"][0])
    assert processed.num_tokens == num_image_tokens(image.width, image.height, num_crops)


def _grid() -> list[tuple[int, dict]]:
    grid = json.loads((GOLDEN / "num_tokens_grid.json").read_text())
    return [(int(key.removeprefix("nc")), entry) for key, entries in grid.items() for entry in entries]


GRID = _grid()


@pytest.mark.parametrize(("num_crops", "entry"), GRID, ids=[f"nc{n}-{e['w']}x{e['h']}" for n, e in GRID])
def test_size_only_token_count_matches_grid(num_crops: int, entry: dict) -> None:
    assert num_image_tokens(entry["w"], entry["h"], num_crops) == entry["calc_num_image_tokens"]
    assert num_image_tokens(entry["w"], entry["h"], num_crops) == entry["from_image_size"]
    assert list(hd_image_size(entry["w"], entry["h"], num_crops)) == entry["image_sizes"]


SMALL_GRID = [(n, e) for n, e in GRID if max(e["w"], e["h"]) <= 2000]


@pytest.mark.parametrize(("num_crops", "entry"), SMALL_GRID, ids=[f"nc{n}-{e['w']}x{e['h']}" for n, e in SMALL_GRID])
def test_real_transform_agrees_with_grid(num_crops: int, entry: dict) -> None:
    processed = preprocess_image(Image.new("RGB", (entry["w"], entry["h"])), num_crops)
    assert list(processed.image_size) == entry["image_sizes"]
    assert processed.num_tokens == entry["calc_num_image_tokens"]
    h, w = entry["image_sizes"][0] // CROP_SIZE, entry["image_sizes"][1] // CROP_SIZE
    assert processed.pixel_values.shape[0] == 1 + h * w <= num_crops + 1


def test_portrait_padding_is_left_and_right_and_white() -> None:
    # 200x900 at nc4: resized (transposed) to 1344x298 -> padded to 336 rows, top = 19; back to portrait.
    processed = preprocess_image(Image.new("RGB", (200, 900), (0, 0, 0)), 4)
    assert processed.image_size == (1344, 336)
    crop = processed.pixel_values[1]
    white = (1.0 - 0.48145466) / 0.26862954
    assert torch.allclose(crop[0, :, :19], torch.full((336, 19), white))
    assert torch.allclose(crop[0, :, 19 : 19 + 298], torch.full((336, 298), -0.48145466 / 0.26862954))
    assert torch.allclose(crop[0, :, 19 + 298 :], torch.full((336, 336 - 317), white))


@pytest.mark.parametrize("num_crops", [0, 17, -1, True, 4.0])
def test_num_crops_out_of_range(num_crops) -> None:
    with pytest.raises(ValueError, match="num_crops"):
        num_image_tokens(640, 480, num_crops)
    with pytest.raises(ValueError, match="num_crops"):
        preprocess_image(Image.new("RGB", (8, 8)), num_crops)


def test_extreme_aspect_ratio_is_a_clear_error() -> None:
    # 1344 / (20000 / 1) < 1: the original would try to resize to a height of 0.
    with pytest.raises(ValueError, match="aspect ratio"):
        hd_image_size(20000, 1, 4)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(Image.new("RGB", (1, 20000)), 4)


# --- decoding ---------------------------------------------------------------------------------------


def test_rgba_drops_alpha_keeping_stored_rgb() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(7, 9, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent pixels keep their stored colour, no compositing on white
    out = decode_image(_png(Image.fromarray(rgba, "RGBA")), BIG)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), rgba[..., :3])


def test_palette_maps_through_palette() -> None:
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0]
    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    img = Image.fromarray(index, "L").convert("P")
    img.putpalette(palette + [0] * (768 - len(palette)))
    out = decode_image(_png(img), BIG)
    assert out.mode == "RGB"
    table = np.array(palette, dtype=np.uint8).reshape(3, 3)
    assert np.array_equal(np.asarray(out), table[index])


def test_greyscale_replicated_to_three_channels() -> None:
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    out = decode_image(_png(Image.fromarray(grey, "L")), BIG)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.repeat(grey[..., None], 3, axis=2))


def test_cmyk_converted_by_pillow() -> None:
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, "TIFF")  # lossless, unlike a CMYK JPEG
    out = decode_image(buf.getvalue(), BIG)
    assert out.mode == "RGB"
    assert np.asarray(out).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]


def test_truncated_png_is_rejected() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _png(Image.fromarray(noise))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], BIG)


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", b"", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"],
    ids=["garbage", "empty", "eps-not-allowed"],
)
def test_garbage_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data, BIG)


def test_pixel_limit_checked_and_named() -> None:
    data = _png(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageDecodeError, match=r"60000 pixels.*limit 59999"):
        decode_image(data, 59_999)
    assert decode_image(data, 60_000).size == (300, 200)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5_000, 60_000])  # 2.5e7 px: our check; 3.6e9 px: Pillow's guard fires first
def test_decompression_bomb_rejected_from_header(side: int) -> None:
    # A header that claims a huge bitmap with no pixel data behind it: rejected before decoding.
    with pytest.raises(ImageDecodeError, match=r"too many pixels.*limit 1000000"):
        decode_image(_png_header_only(side, side), 1_000_000)


def test_exif_orientation_ignored_by_default() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    assert decode_image(data, BIG).size == (40, 20)  # stored pixel order, as the original
    assert decode_image(data, BIG, apply_exif_orientation=True).size == (20, 40)


def test_max_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError):
        decode_image(_png(Image.new("RGB", (2, 2))), 0)
