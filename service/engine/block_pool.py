"""Block ids of the paged KV pool: reference-counted, and full blocks remembered by content.

Prefix caching: a block whose 16 (block_size) tokens are all computed is registered under a hash
of its whole prefix (see `sequence.block_hash`). A later sequence whose prompt starts with the same
blocks takes them instead of recomputing them. Freed blocks keep their content and hash until the
pool hands them out again, least recently freed first, and a sequence's tail blocks are freed
before its head, so shared prefixes are the last to go. A block is "free" whenever no sequence
holds it, cached or not, so "all blocks free" still means an idle pool.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        # Insertion order is eviction order: allocate from the front, free to the back.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV pool: {n} blocks asked, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest run of `hashes` from the start (not yet taken)."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks found by `cached_prefix` (they may be free or shared)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Remember a full block's content; the first block with a given content wins."""
        if block_hash not in self._by_hash and self._hash_of[block] is None:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def _forget(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            del self._by_hash[h]
            self._hash_of[block] = None
