"""Image embeddings of one worker, keyed by image content, bounded in rows.

The same image in another request (a retry, a second question about the same photo, a later turn
whose KV prefix was evicted, a sequence recomputed after preemption) skips the vision tower.

An entry is reserved before its first tile is encoded; tiles may arrive over several steps (the
scheduler bounds vision work per step), and the entry becomes complete when the last tile's
features are laid out and projected. Sequences pin the entries their prefill still has to read;
unpinned entries stay cached and are evicted least recently used first when a new one needs room.
The bound (`--max-image-embed-tokens`) counts every entry's rows, complete or in progress.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class _Entry:
    num_rows: int
    num_tiles: int
    tile_features: list[torch.Tensor] = field(default_factory=list)  # features of tiles [0, tiles_done)
    tiles_done: int = 0
    embeds: torch.Tensor | None = None  # (num_rows, hidden) once complete
    pins: int = 0


@dataclass(frozen=True)
class EncoderCacheStats:
    capacity_rows: int
    used_rows: int
    num_entries: int
    hits: int  # images a sequence found cached or already being encoded when it first needed them
    misses: int


class EncoderCache:
    def __init__(self, capacity_rows: int) -> None:
        self.capacity_rows = capacity_rows
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self.used_rows = 0
        self.hits = 0
        self.misses = 0

    def stats(self) -> EncoderCacheStats:
        return EncoderCacheStats(self.capacity_rows, self.used_rows, len(self._entries), self.hits, self.misses)

    def is_complete(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.embeds is not None

    def tiles_done(self, key: bytes) -> int:
        entry = self._entries.get(key)
        return entry.tiles_done if entry else 0

    def embeds(self, key: bytes) -> torch.Tensor:
        entry = self._entries[key]
        assert entry.embeds is not None, "image embedding read before it was complete"
        self._entries.move_to_end(key)
        return entry.embeds

    def partial_features(self, key: bytes) -> list[torch.Tensor]:
        return list(self._entries[key].tile_features)

    def acquire(self, key: bytes, num_rows: int, num_tiles: int) -> bool:
        """Pin the entry for `key`, reserving room for it if it is new. False when it cannot fit now
        (everything else is pinned); nothing is pinned then."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1  # complete, or being encoded for another sequence: either way not encoded twice
            entry.pins += 1
            self._entries.move_to_end(key)
            return True
        if num_rows > self.capacity_rows or not self._make_room(num_rows):
            return False
        self.misses += 1
        self._entries[key] = _Entry(num_rows, num_tiles, pins=1)
        self.used_rows += num_rows
        return True

    def release(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def add_tiles(self, key: bytes, lo: int, features: torch.Tensor) -> None:
        """Features of tiles [lo, lo + len(features)) of an entry in progress."""
        entry = self._entries.get(key)
        if entry is None or entry.embeds is not None or lo != entry.tiles_done:
            return  # evicted meanwhile, completed by another sequence, or already stored
        entry.tile_features.append(features)
        entry.tiles_done += features.shape[0]

    def complete(self, key: bytes, embeds: torch.Tensor) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.embeds is not None:
            return
        entry.embeds = embeds
        entry.tile_features.clear()
        entry.tiles_done = entry.num_tiles

    def _make_room(self, num_rows: int) -> bool:
        if self.used_rows + num_rows <= self.capacity_rows:
            return True
        free_able = sum(e.num_rows for e in self._entries.values() if e.pins == 0)
        if self.used_rows - free_able + num_rows > self.capacity_rows:
            return False
        for key in [k for k, e in self._entries.items() if e.pins == 0]:
            self.used_rows -= self._entries.pop(key).num_rows
            if self.used_rows + num_rows <= self.capacity_rows:
                break
        return True
