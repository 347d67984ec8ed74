"""Where an image's preprocessed crops live until the vision tower reads them.

The frontend's preprocessing pool writes each image's float32 crops (tiles) once, into a file in a
shared-memory folder (`/dev/shm` on Linux); the worker reads just the tiles a step encodes, when it
encodes them. Pixels never travel through the worker's pipe, and the worker never decodes an image.
The frontend owns the file and deletes it when the request ends, so a cancelled request frees its
pixels at once; a worker that finds the file gone treats the request as ended.

`TensorPixels` holds the crops in the process itself (tests, warm-up, the engine used as a library).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

CROP_SIZE = 336
TILE_SHAPE = (3, CROP_SIZE, CROP_SIZE)
TILE_BYTES = 3 * CROP_SIZE * CROP_SIZE * 4  # float32


class PixelsGone(Exception):
    """The request's pixel file no longer exists (the request ended in the frontend)."""


class PixelSource(Protocol):
    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Tiles [lo, hi) as a float32 tensor (hi - lo, 3, 336, 336)."""
        ...


@dataclass(frozen=True)
class TensorPixels:
    tiles: torch.Tensor  # (num_tiles, 3, 336, 336) float32

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.tiles[lo:hi]


@dataclass(frozen=True)
class PixelFile:
    path: str
    num_tiles: int

    @property
    def nbytes(self) -> int:
        return self.num_tiles * TILE_BYTES

    def read(self, lo: int, hi: int) -> torch.Tensor:
        if not 0 <= lo < hi <= self.num_tiles:
            raise ValueError(f"tiles [{lo}, {hi}) outside 0..{self.num_tiles}")
        out = torch.empty((hi - lo, *TILE_SHAPE), dtype=torch.float32)
        view = out.numpy().data.cast("B")
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(lo * TILE_BYTES)
                got = f.readinto(view)
        except FileNotFoundError:
            raise PixelsGone(self.path) from None
        if got != len(view):
            raise PixelsGone(f"{self.path}: {got} of {len(view)} bytes")
        return out

    @classmethod
    def write(cls, path: str, tiles: torch.Tensor) -> PixelFile:
        data = tiles.to(torch.float32).contiguous()
        with open(path, "wb", buffering=0) as f:
            f.write(data.numpy().data.cast("B"))
        return cls(path, int(data.shape[0]))

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
