"""Inode numbers that stay stable for the life of a mount, and a TTL'd negative cache.

Inode numbers are handed out from a counter, but keyed: the same key (for instance
``("coll", "by_id", "zbbbb-4zz18-...", "dir/file.txt", "file")``) always maps back to the
number it got first, even when the node object behind it is rebuilt (a UUID collection
whose manifest changed gets new node objects for its files, but `stat` keeps showing the
same inode numbers for unchanged paths). Numbers are never reused while the mount lives:
the table keeps every key it has seen. A key costs a tuple and an int, and only paths the
kernel has looked up or listed ever get one, so this stays small next to the manifests.

`forget` from the kernel therefore needs no bookkeeping: nothing is freed, and the next
lookup of the same path finds the same number.

`NegativeCache` remembers names that resolved to "no such collection" for a while, so
repeated `ls by_id/not-there` does not call the API every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

N = TypeVar("N")

ROOT_INODE = 1


class InodeTable(Generic[N]):
    """Keyed, never-reused inode numbers and the live node for each."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, int] = {}
        self._nodes: dict[int, N] = {}
        self._next = ROOT_INODE + 1

    def number(self, key: Hashable) -> int:
        """The inode number of `key`; allocated on first use, then fixed."""
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[key] = ino
        return ino

    def bind(self, ino: int, node: N) -> None:
        """Make `node` the live object behind `ino` (replacing an older one)."""
        self._nodes[ino] = node

    def get(self, ino: int) -> N | None:
        return self._nodes.get(ino)

    def __len__(self) -> int:
        return len(self._nodes)


class NegativeCache:
    """Names known not to exist, each until its time-to-live runs out."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic, limit: int = 100_000):
        self.ttl = ttl
        self._clock = clock
        self._limit = limit
        self._until: dict[str, float] = {}

    def add(self, name: str) -> None:
        if len(self._until) >= self._limit:
            self._expire()
        if len(self._until) >= self._limit:  # still full of live entries: drop the oldest
            self._until.pop(next(iter(self._until)))
        self._until[name] = self._clock() + self.ttl

    def __contains__(self, name: str) -> bool:
        until = self._until.get(name)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[name]
            return False
        return True

    def discard(self, name: str) -> None:
        self._until.pop(name, None)

    def _expire(self) -> None:
        now = self._clock()
        for name in [n for n, t in self._until.items() if t <= now]:
            del self._until[name]
