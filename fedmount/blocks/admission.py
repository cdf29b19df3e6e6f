"""Room in the block cache for readers: blocks being read stay, fetches beyond the room wait their turn.

Why. A reader fetches a whole block on a miss and then reads it piece by piece. When more
readers are at work than the cache holds blocks (16 readers of their own 40 MiB file
through a 128 MiB cache), plain LRU evicts the unread rest of one reader's block to make
room for another's; the first reader's next read misses and fetches its whole block
again, which evicts a third reader's block, and so on: 19.5 times the bytes read were
fetched from Keep. Here a block being read is held (the cache does not evict it), and a
fetch that does not fit beside the held blocks waits until one is released.

Room. The budget is the cache's `capacity` (its disk bound with a disk tier, else its
memory bound). Bytes are committed by blocks being fetched (from admission until they
arrive) and by held blocks. A fetch for a reader is admitted when its block fits in what
is not committed, or when nothing is committed (a block larger than the cache is still
read, one at a time); otherwise it queues, first come first served. A read-ahead fetch, or a hold
on a block found in the cache, is taken only when it fits and nobody is queued: neither
ever jumps the queue. A block already committed (being fetched or held) costs nothing
more, whoever asks for it.

Holds. A block fetched for a sequential reader, or read sequentially from the cache, is
held until its readers are past it. Readers are told apart by position, as `FileReader`
tells sequential reads from seeks: each reader is a cursor (where its last read ended); a
sequential read of the block that starts up to `AHEAD` after a cursor moves it (the one
just behind it), one up to `BACK` before a cursor belongs to it (the kernel's read-ahead
has many requests in flight, answered in any order), any other sequential read adds one.
A cursor ends at the end of the block, or after `IDLE` seconds without moving: its reader
stopped (its file ended inside the block, it closed the file, it went away). The hold
ends with its last cursor. Random reads take no hold: they would keep blocks for reads
that may never come.

So that no reader can keep others out for ever, a hold older than `MAX_HOLD` seconds is
released when someone is queued. Idle cursors are swept when room is needed (a queued
fetch looks again every `IDLE / 4` seconds) and whenever a hold is taken.

The kernel's queue. Waiting happens inside FUSE read requests, and the kernel lets only
so many read requests into the daemon at once (``max_background``: 12 by default; the
mount raises it when run as root). Were all of them waiting for room, the reads of the
readers holding the blocks could never arrive, and the holds could never end. So at most
three quarters of that many requests wait (`max_waiting`); a fetch beyond that is
admitted over budget (``fetch_over_budget``): the cache then exceeds its bound by the
blocks being read, until their readers are past them. Without root and with more
readers than the cache holds blocks, this is what happens.

What a reader may still see: a slow reader (more than `IDLE` seconds between reads) loses
its hold; its block is then evicted only if room is needed, and its next read waits its
turn for the block again.

Stats: ``cache_held_bytes`` (gauge), ``fetch_waits`` (fetches that queued) and
``fetch_wait_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from fedmount.stats import Stats

from .cache import BlockCache

log = logging.getLogger("fedmount.admission")

MiB = 1 << 20
BACK = 8 * MiB  # how far behind a cursor a read still belongs to it (the kernel's read-ahead: 4 MiB)
AHEAD = 16 * MiB  # how far ahead of a cursor a read still continues it
IDLE = 1.0  # seconds a cursor may stand still before its reader counts as gone
MAX_HOLD = 60.0  # seconds a hold may keep a block while others are queued
MAX_CURSORS = 64  # per block: the oldest goes first
KERNEL_REQUESTS = 12  # read requests the kernel sends a FUSE daemon at once, unless raised (its default)


@dataclass
class _Hold:
    size: int
    since: float
    cursors: dict[int, float] = field(default_factory=dict)  # position -> when it last moved


@dataclass
class _Ticket:
    key: str
    size: int
    since: float
    granted: trio.Event = field(default_factory=trio.Event)
    committed: bool = False  # its grant committed the block's room (nobody had before)


class Admission:
    """The cache's room, shared by every reader of one `BlockReader` (see the module docstring)."""

    def __init__(self, cache: BlockCache, stats: Stats, clock: Callable[[], float] = time.monotonic):
        self._cache = cache
        self._stats = stats
        self._clock = clock
        self._fetching: dict[str, int] = {}  # admitted fetches: key -> size
        self._holds: dict[str, _Hold] = {}
        self._committed = 0  # bytes: admitted fetches + holds
        self._held = 0  # bytes: holds
        self._queue: deque[_Ticket] = deque()
        self._swept = 0.0
        self.max_waiting = KERNEL_REQUESTS * 3 // 4  # see "The kernel's queue"

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _fits(self, size: int) -> bool:
        return self._committed == 0 or self._committed + size <= self._cache.capacity

    def _commit(self, key: str, size: int) -> None:
        self._fetching[key] = size
        self._committed += size

    def committed(self, key: str) -> bool:
        return key in self._fetching or key in self._holds

    # fetches -----------------------------------------------------------------------

    def try_fetch(self, key: str, size: int) -> bool:
        """Admit a fetch that must not wait (a read-ahead fetch): only if it fits and nobody is queued."""
        if self.committed(key):
            return True
        if self._queue or not self._fits(size):
            self._sweep(force=True)
            if self._queue or not self._fits(size):
                return False
        self._commit(key, size)
        return True

    async def fetch(self, key: str, size: int) -> bool:
        """Admit a fetch for a reader, waiting its turn if the block does not fit now; whether it
        waited (then the block may have arrived meanwhile)."""
        if self.committed(key):
            return False
        if not self._queue and self._fits(size):
            self._commit(key, size)
            return False
        if len(self._queue) >= self.max_waiting:  # see "The kernel's queue"
            self._stats.add("fetch_over_budget")
            self._commit(key, size)
            self._grant()
            return False
        ticket = _Ticket(key, size, self._clock())
        self._queue.append(ticket)
        self._stats.add("fetch_waits")
        try:
            while not ticket.granted.is_set():
                self._sweep(force=True)
                self._grant()
                with trio.move_on_after(IDLE / 4):
                    await ticket.granted.wait()
        except BaseException:
            if ticket.committed:
                self.fetched(key, None)
            elif not ticket.granted.is_set():
                self._queue.remove(ticket)
                self._grant()
            raise
        finally:
            self._stats.add("fetch_wait_seconds", self._clock() - ticket.since)
        return True

    def fetched(self, key: str, reader_at: int | None) -> None:
        """An admitted fetch ended: its block is held for the reader about to read from `reader_at`
        (a sequential reader), else its room is released."""
        size = self._fetching.pop(key, None)
        if size is None:
            return
        if reader_at is None:
            self._committed -= size
            self._grant()
        else:
            now = self._clock()
            self._hold(key, _Hold(size, now, {reader_at: now}))

    def _grant(self) -> None:
        """Let queued fetches of blocks already committed go; admit the others in order while the
        first one fits."""
        while self._queue:
            for ticket in [t for t in self._queue if self.committed(t.key)]:
                self._queue.remove(ticket)
                ticket.granted.set()
            if not self._queue or not self._fits(self._queue[0].size):
                return
            ticket = self._queue.popleft()
            self._commit(ticket.key, ticket.size)
            ticket.committed = True
            ticket.granted.set()

    # holds -------------------------------------------------------------------------

    def read(self, key: str, size: int, offset: int, end: int) -> None:
        """A sequential read of [offset, end) of the block was served: move its reader's cursor.

        On every sequential read of a warm file: kept to a dict lookup and a loop over the
        block's cursors (usually one)."""
        hold = self._holds.get(key)
        if hold is None:
            hold = self._hold_cached(key, size, end)
            if hold is None:
                return
        cursors = hold.cursors
        behind = ahead = -1  # the nearest cursor at or before `offset`, else just after it
        for pos in cursors:
            if pos <= offset:
                if pos > behind and offset - pos <= AHEAD:
                    behind = pos
            elif pos - offset <= BACK and (ahead < 0 or pos < ahead):
                ahead = pos
        pos = behind if behind >= 0 else ahead
        now = self._clock()
        if pos >= 0:
            if end <= pos:  # a request its reader's cursor is past already (answered late)
                cursors[pos] = now
                return
            del cursors[pos]
        if end < size:
            cursors[end] = now
            if len(cursors) > MAX_CURSORS:
                del cursors[next(iter(cursors))]
        elif not cursors:
            self._release(key, "its readers are past it")

    def _hold_cached(self, key: str, size: int, end: int) -> _Hold | None:
        """Hold a block found in the cache for a sequential reader, if it fits and nobody waits."""
        if key in self._fetching or end >= size or self._queue or not self._fits(size):
            return None
        self._sweep()
        hold = _Hold(size, self._clock())
        self._committed += size
        self._hold(key, hold)
        return hold

    def _hold(self, key: str, hold: _Hold) -> None:
        """Hold a block whose room is committed already."""
        self._holds[key] = hold
        self._held += hold.size
        self._cache.hold(key)
        self._stats.set("cache_held_bytes", self._held)

    def _release(self, key: str, why: str) -> None:
        log.debug("block %s released: %s", key, why)
        hold = self._holds.pop(key)
        self._committed -= hold.size
        self._held -= hold.size
        self._cache.release(key)
        self._stats.set("cache_held_bytes", self._held)
        self._grant()

    def _sweep(self, force: bool = False) -> None:
        """Drop idle cursors and, when someone is queued, holds older than `MAX_HOLD`; release holds
        left without cursors. Unless `force`d, at most once every `IDLE / 4` seconds."""
        now = self._clock()
        if not force and now - self._swept < IDLE / 4:
            return
        self._swept = now
        for key, hold in list(self._holds.items()):
            why = "its readers stopped"
            if self._queue and now - hold.since > MAX_HOLD:
                hold.cursors.clear()
                why = f"held for {MAX_HOLD:g}s while others wait"
            for pos in [p for p, moved in hold.cursors.items() if now - moved > IDLE]:
                del hold.cursors[pos]
            if not hold.cursors:
                self._release(key, why)
