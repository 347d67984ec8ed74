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


class TenantSlots:
    """Each tenant's bound on requests in flight (--max-requests-per-tenant; 0 = none), so one tenant
    cannot fill the queue for everyone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, Slots] = {}

    @contextmanager
    def take(self, tenant: str) -> Iterator[None]:
        if not self.limit:
            yield
            return
        slots = self._slots.setdefault(
            tenant, Slots(self.limit, f"requests of tenant {tenant!r} are in flight", "--max-requests-per-tenant")
        )
        try:
            with slots.take():
                yield
        finally:
            if slots.count == 0:
                self._slots.pop(tenant, None)


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
