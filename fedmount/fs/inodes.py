"""Inode numbers that stay stable for the life of a mount, and a TTL'd negative cache.

Memory is the design constraint: a mount may list collections of millions of files, and
the kernel may hold an inode for each of them, so the table must not keep a Python object
(or even a dict entry) per listed entry. It hands out three kinds of numbers from one
counter, never reused while the mount lives:

- Keyed single numbers (`number`, `bind`): the same key (for instance
  ``("readme", 1)``) always maps back to the number it got first. They are for the few
  things that have a node object of their own: the root, ``by_id``, READMEs, the stats
  file, collection roots and record files, and the rare collection entries that appeared
  after their directory was first seen, or whose content changed. `bind` may also give a
  number of a range a node of its own, which then takes precedence over the range's owner
  (a file version a refresh superseded).
- Unkeyed single numbers (`new`, `bind`): for the projects listed in directories, which
  keep their nodes by object uuid themselves; such an entry costs the table its node's
  slot and no key.
- Ranges (`allocate`): a collection directory, the first time the kernel looks into it,
  gets one contiguous range of numbers, one per entry in the order of its manifest
  directory; its owner (a `RangeOwner`) turns a number of its range back into a node on
  demand. A range costs the table one array slot and one list slot, whatever its size. A
  page of a listing gets one for its new collections (`fedmount.fs.listed.PageNumbers`,
  which keeps their nodes).

`get` finds a number's node: a dict look-up for single numbers, else a bisection of the
ranges' start numbers. Since nothing is kept per entry, `forget` from the kernel needs no
bookkeeping: the next lookup of the same path finds the same number.

`NegativeCache` remembers names that resolved to "no such collection" for a while, so
repeated `ls by_id/not-there` does not call the API every time.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

N = TypeVar("N")
N_co = TypeVar("N_co", covariant=True)

ROOT_INODE = 1


class RangeOwner(Protocol[N_co]):
    """Whoever numbers a range of inodes: makes the node of one of its numbers on demand."""

    def node_at(self, ino: int) -> N_co | None: ...


class InodeTable(Generic[N]):
    """Keyed single inode numbers with their live nodes, and ranges with their owners."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, int] = {}
        self._nodes: dict[int, N] = {}
        self._starts = array("Q")  # ascending: numbers are handed out in order
        self._ends = array("Q")
        self._owners: list[RangeOwner[N]] = []
        self._next = ROOT_INODE + 1

    def number(self, key: Hashable) -> int:
        """The inode number of `key`; allocated on first use, then fixed."""
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[key] = ino
        return ino

    def new(self) -> int:
        """A fresh number, keyed by nothing: its caller keeps the node that has it (and binds
        it), as a listed directory keeps its entries by object uuid."""
        ino = self._next
        self._next += 1
        return ino

    def bind(self, ino: int, node: N) -> None:
        """Make `node` the live object behind `ino` (replacing an older one)."""
        self._nodes[ino] = node

    def allocate(self, count: int, owner: RangeOwner[N]) -> int:
        """The first of `count` fresh consecutive numbers, whose nodes `owner` makes."""
        start = self._next
        self._next += count
        if count:
            self._starts.append(start)
            self._ends.append(start + count)
            self._owners.append(owner)
        return start

    def get(self, ino: int) -> N | None:
        node = self._nodes.get(ino)
        if node is not None:
            return node
        i = bisect_right(self._starts, ino) - 1
        if i < 0 or ino >= self._ends[i]:
            return None
        return self._owners[i].node_at(ino)

    def __len__(self) -> int:
        """How many numbers have a node (bound, or in a range)."""
        return len(self._nodes) + sum(self._ends) - sum(self._starts)


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
