"""The server's folder of preprocessed pixels in shared memory, and the byte budget it may hold.

Every image of a request in flight keeps its crops here (`engine.pixels.PixelFile`) until the request
ends, so a worker can read them when it encodes them, again after a preemption, or another worker
after a retry. The budget bounds that memory: past it, new image requests are shed (they could fit
later). The folder is private to this server process and removed with it; folders left by dead
servers are removed at start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.pixels import TILE_BYTES, PixelFile
from ..errors import InvalidInput, Overloaded

log = logging.getLogger("visionchat.preprocess")
PREFIX = "visionchat-"


def default_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PixelReservation:
    """Paths for one request's images and the bytes they were budgeted at."""

    paths: tuple[str, ...]
    nbytes: int
    # Exists while the request still wants its pixels; the job writing them stops when it is gone.
    live_marker: str = ""
    released: bool = field(default=False, compare=False)


class PixelStore:
    def __init__(self, budget_bytes: int, base: Path | None = None) -> None:
        self.budget_bytes = budget_bytes
        base = base or default_base()
        self.folder = base / f"{PREFIX}{os.getpid()}"
        for old in base.glob(f"{PREFIX}*"):
            suffix = old.name.removeprefix(PREFIX)
            if suffix.isdigit() and (int(suffix) == os.getpid() or not _alive(int(suffix))):
                shutil.rmtree(old, ignore_errors=True)
        self.folder.mkdir(mode=0o700)
        self.used_bytes = 0
        room = int(shutil.disk_usage(self.folder).total * 0.9)
        if budget_bytes > room:
            # A container's /dev/shm is often 64 MiB: writes past it fail, so the budget must fit it.
            log.warning(
                "--max-pixel-memory %d exceeds 90%% of %s (%d bytes); using %d (mount a larger /dev/shm)",
                budget_bytes,
                base,
                room,
                room,
            )
            self.budget_bytes = room

    def reserve(self, tiles_per_image: list[int]) -> PixelReservation:
        """Room for images (or video frames) of these tile counts, or Overloaded when the budget cannot
        take them now."""
        nbytes = sum(tiles_per_image) * TILE_BYTES
        if nbytes > self.budget_bytes:
            raise InvalidInput(
                "images",
                f"the images and video frames need {nbytes} bytes of preprocessed pixels ({sum(tiles_per_image)} "
                f"crops); the server holds at most {self.budget_bytes} (--max-pixel-memory)",
            )
        if self.used_bytes + nbytes > self.budget_bytes:
            raise Overloaded(
                f"{self.used_bytes} of {self.budget_bytes} bytes of preprocessed pixels are in use by other requests "
                "(--max-pixel-memory); retry later"
            )
        self.used_bytes += nbytes
        paths = tuple(str(self.folder / f"{uuid.uuid4().hex}.f32") for _ in tiles_per_image)
        marker = self.folder / f"{uuid.uuid4().hex}.live"
        marker.touch()
        return PixelReservation(paths, nbytes, str(marker))

    @staticmethod
    def abandon(reservation: PixelReservation) -> None:
        """Tell the job filling this reservation to stop (its files are deleted by `release` once it has)."""
        Path(reservation.live_marker).unlink(missing_ok=True)

    def release(self, reservation: PixelReservation) -> None:
        """Delete the request's pixel files (whether or not they were written) and return its bytes."""
        if reservation.released:
            return
        reservation.released = True
        self.abandon(reservation)
        for path in reservation.paths:
            PixelFile(path, 0).delete()
        self.used_bytes -= reservation.nbytes

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
