"""The memory tier: an LRU of verified 1 MiB chunks of fetched blocks, keyed by ``(key, chunk index)``.

A block stored from a plain buffer (no disk tier, or one that could not receive it into
its file) lands here as zero-copy views of that buffer, bounded by ``limit`` bytes; with
no disk tier this is the only tier, and then the blocks being read (held, see
admission.py) are never evicted from it. A block received into its block file is not kept
here: views of a file's mapping live only under its lease (disk.py), so its readers read
it from the disk tier.

Stats: ``cache_ram_bytes`` (gauge).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, KeysView

from fedmount.stats import Stats

from .format import CHUNK, chunk_count, key_size


class MemoryTier:
    def __init__(self, limit: int, stats: Stats):
        self.limit = limit
        self._stats = stats
        self._chunks: OrderedDict[tuple[str, int], bytes | memoryview] = OrderedDict()
        self.slots: KeysView[tuple[str, int]] = self._chunks.keys()  # (key, index) of the chunks held
        self.used = 0  # bytes

    def get(self, key: str, index: int) -> bytes | memoryview | None:
        """A chunk of a block, or None; a hit makes it the most recently used."""
        slot = (key, index)
        chunk = self._chunks.get(slot)
        if chunk is not None:
            self._chunks.move_to_end(slot)
        return chunk

    def put_block(self, key: str, view: memoryview, keep: Container[str] = ()) -> None:
        """Store a block as views of `view`, chunk by chunk; evicting spares the blocks in `keep`."""
        for index in range(chunk_count(len(view))):
            self._put(key, index, view[index * CHUNK : (index + 1) * CHUNK], keep)

    def _put(self, key: str, index: int, chunk: bytes | memoryview, keep: Container[str]) -> None:
        slot = (key, index)
        old = self._chunks.pop(slot, None)
        if old is not None:
            self.used -= len(old)
        self._chunks[slot] = chunk
        self.used += len(chunk)
        if self.used > self.limit:
            for victim in [s for s in self._chunks if s[0] not in keep]:
                if self.used <= self.limit:
                    break
                self.used -= len(self._chunks.pop(victim))
        self._stats.set("cache_ram_bytes", self.used)

    def drop(self, key: str) -> None:
        """Forget every chunk of a block."""
        for index in range(chunk_count(key_size(key))):
            chunk = self._chunks.pop((key, index), None)
            if chunk is not None:
                self.used -= len(chunk)

    def cached_bytes(self, key: str) -> int:
        chunks = (self._chunks.get((key, i)) for i in range(chunk_count(key_size(key))))
        return sum(len(c) for c in chunks if c is not None)
