"""Counted slots with a limit: requests queued for a first token, uploads in progress.

A slot is taken before the heavy work it guards and given back exactly once, by `release` or when
the `with` block ends, whichever comes first; a full count refuses at once with `Overloaded`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import Overloaded


@dataclass
class Slot:
    counter: Slots
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.counter.count -= 1


class Slots:
    def __init__(self, limit: int, what: str, flag: str) -> None:
        self.limit = limit
        self.what = what
        self.flag = flag
        self.count = 0

    @contextmanager
    def take(self) -> Iterator[Slot]:
        if self.count >= self.limit:
            raise Overloaded(f"{self.count} {self.what} (limit {self.flag} {self.limit}); retry later")
        self.count += 1
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot.release()
