"""Reads and read-ahead: turn file reads into block reads, fetch each block once, stay ahead.

# Design

A `FileReader` serves one open file handle. A read at ``(offset, size)`` is mapped onto
the file's segments (bisect over their file offsets) and each piece is asked from the
`BlockReader`, which answers from the block cache (memory chunk or disk file) or, on a
miss, from Keep. The pieces are joined in order; a `BlockError` on any of them is raised
as is (the FUSE layer turns it into EIO; its message says which block and services).

A read is not copied on its way through: a read within one block comes back as the
cache's read-only view (of the block file's mapping, or of one chunk of a block fetched
into memory), a read of a block just fetched as a view of the fetched bytes; the FUSE
adapter hands it to pyfuse3, which copies it into the reply. A read made of several
pieces (it crosses a block boundary) joins them.

## Sequential detection and the window

Like mountpoint-s3's prefetcher, the reader keeps the offset where the previous read
ended. A read that starts there, or slightly off it (up to 1 MiB back or 16 MiB ahead:
the kernel's readahead and parallel FUSE requests do not arrive in perfect order), is
sequential; anything else is a seek and resets the read-ahead window to 0. A file's
first read at offset 0 counts as sequential.

The window is counted in blocks. A sequential reader that moves into a new block sets it
to ``max(initial_window, 2 * window)``, at most ``prefetch_blocks``: with the defaults a
fresh reader keeps 4 blocks fetched ahead at once and 8 from its second block on. The
start is wide on purpose. Keep serves one block per connection, and a remote cluster is
typically bound per connection (latency, a per-flow bandwidth cap, one keepstore
disk): a reader that starts at 1 and doubles (1, 2, 4, ...) never has the parallelism
the link offers while it reads the first few blocks, and a 4-block file is over before
the window is open (measured here on a cluster shaped to +20 ms and 100 MB/s per
connection, a 256 MiB file: 0.45 of 4 parallel raw GETs with 1/2/4, 0.77 with 4 from the
start, the rest being the copy of the whole file through FUSE once its blocks arrive
together). Locally, several blocks in flight also let 2 cores hash 2 blocks at once.

One exception keeps probes cheap: a handle's first read that is smaller than ``PEEK``
(64 KiB) and does not reach the end of the file is a *peek* (``head``, ``file``, a
1-byte time-to-first-byte probe; the kernel asks 16-32 KiB for those, and 512 KiB or
more for ``cat``, ``md5sum`` or ``dd``). A peek fetches only its own block, alone, so
that block arrives as fast as the link allows and nothing is spent on blocks nobody may
read; the reader's next sequential read opens the window. A small file read whole (the
read reaches its end) is not a peek: the blocks after it in the stream are the next
files of its directory.

Growth per block rather than per request keeps the per-read cost at a bisect and a dict
lookup (arv-mount had to evaluate its prefetch only every 128th read because it was
per-request, #21639), and a 64 MiB block is long enough for the next one to arrive while
it is read.

## What is prefetched

The blocks that follow the current one *in the stream*, not just in the file: the
file's own later segments first, then ``segment.stream.blocks[segment.block_index + 1:]``.
Arvados packs many small files into one 64 MiB block and writes files of a directory
one after the other, so reading one file of a directory warms the next files too, and
the block holding the next file is often already in memory when it is opened. The
manifest gives the exact block list up front: no guessing about object sizes, no Range
requests past the end.

Blocks already on the disk cache are read ahead too, at a finer grain: a sequential read
asks the cache to have the next ``CHUNK_READAHEAD`` 1 MiB chunks of its block verified
(cache.py checks them in a worker thread, which also faults their pages in), and a read
within ``CHUNK_READAHEAD`` MiB of the end of its block has the cache `preload` the start
of the file's next block, so a remount reading warm data does not stall at each block
boundary while the next block file is opened, mapped and checked.

## Limits

- One fetch per block on the whole host process: an in-flight table keyed by
  ``hash+size`` makes every concurrent reader of a block (demand or prefetch, any file,
  any collection) wait for the same GET; the block is cached once and handed to all.
- Prefetches are bounded by ``per_service`` concurrent GETs (default 4) to the block's
  first-choice keep service (rendezvous order) and ``per_cluster`` (default 8) per
  cluster, so read-ahead cannot monopolise a keepstore, and by a memory budget
  ``prefetch_memory`` (default 512 MiB, eight 64 MiB blocks): a prefetch starts only if
  the bytes of all in-flight fetches stay below it (a block is then owned by the
  cache's bounded memory tier). Over the budget, or when the cache has no room for the
  block (admission.py), prefetch is skipped, not queued; the next block change asks
  again. A demand fetch is never limited by these, but waits its turn for room in the
  cache when readers outnumber it (admission.py), and the block it fetched for a
  sequential reader stays in the cache until that reader is past it. The limits are sized
  so that one sequential reader's full window fits: its GETs spread over a cluster's
  keepstores by rendezvous order, and with two keepstores a window of 4 puts 2-4 on one.
- A prefetch first checks whether the block is already cached and then costs nothing.
- Prefetch failures are counted and dropped; a demand read that was waiting on a failed
  prefetch starts its own fetch, so its error (or its bytes) are its own.

## Stats

``prefetch_depth`` (gauge: window of the most recently advanced reader),
``prefetch_inflight_bytes`` (gauge), ``prefetch_started``, ``prefetch_used`` and
``prefetch_wasted`` (blocks fetched ahead that a reader later touched, or that aged out
of the tracking table of ``TRACKED`` entries untouched), ``prefetch_errors``; the cache
counts hits and misses (count and bytes).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

import trio

from fedmount.federation.ids import Locator
from fedmount.stats import Stats

from .admission import Admission
from .cache import BlockCache, Reservation
from .keep import BlockError, KeepClient, KeepRoute, probe_order

if TYPE_CHECKING:
    from fedmount.federation.manifest import File, Segment

log = logging.getLogger("fedmount.prefetch")

MiB = 1 << 20
SEEK_BACK_TOLERANCE = 1 * MiB
SEEK_AHEAD_TOLERANCE = 16 * MiB
TRACKED = 256  # prefetched blocks remembered for the used/wasted accounting
DEFAULT_PREFETCH_BLOCKS = 8  # blocks a sequential reader's window grows to
INITIAL_WINDOW = 4  # blocks a fresh sequential reader keeps fetched ahead
PEEK = 64 << 10  # a handle's first read smaller than this (not reaching EOF) prefetches nothing
CHUNK_READAHEAD = 16  # cache chunks (1 MiB) a sequential reader has verified ahead of it


class _Fetch:
    """One in-flight block fetch; any number of readers wait on it."""

    def __init__(self, locator: Locator, *, prefetch: bool, reader_at: int | None = None):
        self.locator = locator
        self.prefetch = prefetch  # a read-ahead: its failure is not a reader's answer
        self.reader_at = reader_at  # where the sequential reader it is for reads first (admission.py)
        self.done = trio.Event()
        self.data: bytes | bytearray | memoryview | None = None  # None after success: in the cache
        self.error: BlockError | None = None

    async def wait(self) -> bytes | bytearray | memoryview | None:
        await self.done.wait()
        if self.error is not None:
            raise type(self.error)(self.error.locator, str(self.error)) from self.error
        return self.data


class BlockReader:
    """Cache + Keep + in-flight dedupe + bounded prefetch; one per daemon, shared by all files."""

    def __init__(
        self,
        keep: KeepClient,
        cache: BlockCache,
        *,
        stats: Stats | None = None,
        prefetch_blocks: int = DEFAULT_PREFETCH_BLOCKS,
        initial_window: int = INITIAL_WINDOW,
        prefetch_memory: int = 512 * MiB,
        per_service: int = 4,
        per_cluster: int = 8,
    ):
        self._keep = keep
        self._cache = cache
        self.stats = stats if stats is not None else Stats()
        self.prefetch_blocks = prefetch_blocks
        self.initial_window = initial_window
        self._prefetch_memory = prefetch_memory
        self._inflight: dict[str, _Fetch] = {}
        self._inflight_bytes = 0
        self._service_limits: defaultdict[str, trio.CapacityLimiter] = defaultdict(
            lambda: trio.CapacityLimiter(per_service)
        )
        self._cluster_limits: defaultdict[str, trio.CapacityLimiter] = defaultdict(
            lambda: trio.CapacityLimiter(per_cluster)
        )
        self._prefetched: OrderedDict[str, int] = OrderedDict()  # fetched ahead, not yet used
        self._admission = Admission(cache, self.stats)

    def allow_requests(self, count: int) -> None:
        """The kernel sends up to `count` read requests at once: how many may wait for room in the
        cache (admission.py, "The kernel's queue")."""
        self._admission.max_waiting = max(1, count * 3 // 4)

    def open(self, file: File, route: KeepRoute) -> FileReader:
        return FileReader(self, file, route)

    async def read(
        self, locator: Locator, route: KeepRoute, offset: int, length: int, *, sequential: bool = False
    ) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset+length) of one block, from the cache or fetched (once) from Keep.

        Possibly a read-only view (see the module docstring). A `sequential` reader also gets
        the next cached chunks verified ahead of it, and holds the block while it reads it; a
        fetch waits its turn for room in the cache (admission.py)."""
        key = locator.key
        self._mark_used(key)
        readahead = CHUNK_READAHEAD if sequential else 0
        while True:
            fetch = self._inflight.get(key)
            if fetch is None:
                data = await self._cache.read(key, offset, length, readahead=readahead)
                if data is not None:
                    break
                fetch = self._inflight.get(key)
            if fetch is None:
                if await self._admission.fetch(key, locator.size) and key not in self._inflight:
                    data = await self._cache.read(key, offset, length, readahead=readahead)
                    if data is not None:  # it arrived while this reader waited its turn
                        self._admission.fetched(key, None)
                        break
                fetch = self._inflight.get(key) or self._start(
                    locator, route, prefetch=False, reader_at=offset if sequential else None
                )
            try:
                block = await fetch.wait()
            except BlockError:
                if not fetch.prefetch:
                    raise
                # The read joined a read-ahead that failed: that answer was the read-ahead's,
                # so the reader makes its own attempt (and gets its own error).
                continue
            if block is not None:
                data = memoryview(block)[offset : offset + length].toreadonly()
                break
            # else a prefetch found it cached (or a fetch ended before this reader woke): read it from there
        if sequential:
            self._admission.read(key, locator.size, offset, offset + len(data))
        return data

    def preload(self, locator: Locator, offset: int, length: int) -> None:
        """Have the cache verify [offset, offset+length) of a block on disk ahead of a reader."""
        if locator.key not in self._inflight:  # a block being fetched lands in memory anyway
            self._cache.preload(locator.key, offset, length)

    def prefetch(self, locator: Locator, route: KeepRoute) -> None:
        """Fetch a block in the background if it is not in flight and the budget allows."""
        if locator.key in self._inflight or locator.size == 0:
            return
        if self._inflight_bytes + locator.size > self._prefetch_memory or not self._admission.try_fetch(
            locator.key, locator.size
        ):
            self.stats.add("prefetch_over_budget")
            return
        self._start(locator, route, prefetch=True)

    def _start(
        self, locator: Locator, route: KeepRoute, *, prefetch: bool, reader_at: int | None = None
    ) -> _Fetch:
        """Fetch a block in the background; its room in the cache is admitted already."""
        fetch = _Fetch(locator, prefetch=prefetch, reader_at=reader_at)
        log.debug("fetching %s (%s)", locator.key, "ahead" if prefetch else f"for a reader at {reader_at}")
        self._inflight[locator.key] = fetch
        self._inflight_bytes += locator.size
        self.stats.set("prefetch_inflight_bytes", self._inflight_bytes)
        trio.lowlevel.spawn_system_task(self._run, fetch, route, prefetch, name=f"fetch {locator.key}")
        return fetch

    async def _run(self, fetch: _Fetch, route: KeepRoute, prefetch: bool) -> None:
        """Fetch, hand the bytes to the waiters, then cache them. Never raises."""
        locator = fetch.locator
        key = locator.key
        reservation: Reservation | None = None
        try:
            if prefetch:
                self.stats.add("prefetch_started")
                first = probe_order(locator.hash, route.services)[0].uuid if route.services else ""
                async with self._service_limits[first], self._cluster_limits[route.cluster]:
                    cached = await trio.to_thread.run_sync(self._cache.cached_bytes, key)
                    if cached < locator.size:
                        fetch.data, reservation = await self._get(locator, route)
            else:
                fetch.data, reservation = await self._get(locator, route)
            data = fetch.data
            fetch.done.set()
            if data is not None:
                if prefetch:
                    self._track(key, locator.size)
                self._admission.fetched(key, fetch.reader_at)  # held before `put` can evict anything
                await self._cache.put(key, data, reservation)
                reservation = None  # the cache's now
        except BlockError as exc:
            fetch.error = exc
            if prefetch:
                self.stats.add("prefetch_errors")
                log.debug("prefetch of %s failed: %s", key, exc)
        except Exception as exc:  # a bug must fail the readers, not the daemon
            log.exception("fetching block %s failed unexpectedly", key)
            fetch.error = BlockError(locator, f"block {key}: internal error {type(exc).__name__}: {exc}")
        finally:
            if reservation is not None:  # the fetch failed or was cancelled
                reservation.abandon()
            if fetch.error is None and not fetch.done.is_set():  # cancelled at shutdown
                fetch.error = BlockError(locator, f"block {key}: fetch cancelled")
            fetch.done.set()
            fetch.data = None  # the cache holds it now; do not pin it here
            self._admission.fetched(key, None)  # unless it is held already
            if self._inflight.get(key) is fetch:  # a KeyError here would end the daemon (trio system task)
                del self._inflight[key]
            self._inflight_bytes -= locator.size
            self.stats.set("prefetch_inflight_bytes", self._inflight_bytes)

    async def _get(
        self, locator: Locator, route: KeepRoute
    ) -> tuple[bytes | bytearray | memoryview, Reservation | None]:
        """The block from Keep, received into a reservation of its cache file when the cache can
        make one (cache.py, "Filling"); the reservation is abandoned if the fetch fails."""
        reservation = await self._cache.reserve(locator.key)
        try:
            data = await self._keep.get(locator, route, None if reservation is None else reservation.buffer)
        except BaseException:
            if reservation is not None:
                reservation.abandon()
            raise
        return data, reservation

    def _track(self, key: str, size: int) -> None:
        self._prefetched[key] = size
        while len(self._prefetched) > TRACKED:
            self._prefetched.popitem(last=False)
            self.stats.add("prefetch_wasted")

    def _mark_used(self, key: str) -> None:
        if self._prefetched.pop(key, None) is not None:
            self.stats.add("prefetch_used")


class FileReader:
    """One open file: maps reads to block pieces, detects sequential access, reads ahead."""

    def __init__(self, reader: BlockReader, file: File, route: KeepRoute):
        self._reader = reader
        self._route = route
        self._segments: Sequence[Segment] = file.segments()
        self._starts = [s.file_offset for s in self._segments]
        self.size = file.size
        self._next = 0  # where the previous read ended
        self._window = 0  # blocks to keep fetched ahead of the current one
        self._block: int | None = None  # segment index of the block being read sequentially
        self._fresh = True  # no read yet: the first one may be a peek
        self._closed = False

    @property
    def window(self) -> int:
        return self._window

    async def read(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset+size) of the file, possibly a read-only view."""
        end = min(self.size, offset + size)
        if end <= offset:
            return b""
        sequential = self._next - SEEK_BACK_TOLERANCE <= offset <= self._next + SEEK_AHEAD_TOLERANCE
        if not sequential:
            self._window = 0
            self._block = None
        self._next = end
        peek = self._fresh and size < PEEK and end < self.size
        self._fresh = False
        index = bisect_right(self._starts, offset) - 1
        pieces = []
        pos = offset
        while pos < end:
            seg = self._segments[index]
            start = pos - seg.file_offset
            take = min(seg.length - start, end - pos)
            if sequential and not peek:
                self._advance(index)
            piece = await self._reader.read(
                seg.locator, self._route, seg.block_offset + start, take, sequential=sequential
            )
            pos += take
            index += 1
            pieces.append(piece)
        if sequential and not peek and index < len(self._segments):
            # Close to the end of this piece: the cache loads the next block's start from disk.
            nxt = self._segments[index]
            if (
                self._starts[index] - end < CHUNK_READAHEAD * MiB
                and nxt.locator.key != self._segments[index - 1].locator.key
            ):
                self._reader.preload(nxt.locator, nxt.block_offset, CHUNK_READAHEAD * MiB)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _advance(self, index: int) -> None:
        """A sequential reader is at segment `index`: grow the window on a new block, prefetch."""
        if index == self._block:
            return
        self._block = index
        self._window = min(self._reader.prefetch_blocks, max(self._reader.initial_window, self._window * 2))
        self._reader.stats.set("prefetch_depth", self._window)
        if not self._closed:
            for locator in self._upcoming(index):
                self._reader.prefetch(locator, self._route)

    def _upcoming(self, index: int) -> list[Locator]:
        """The next `window` distinct blocks after segment `index`: this file's, then its stream's."""
        current = self._segments[index].locator.key
        seen = {current}
        out: list[Locator] = []
        for seg in islice(self._segments, index + 1, None):
            if len(out) >= self._window:
                return out
            if seg.locator.key not in seen:
                seen.add(seg.locator.key)
                out.append(seg.locator)
        tail = self._segments[-1]
        for locator in tail.stream.blocks[tail.block_index + 1 : tail.block_index + 1 + self._window]:
            if len(out) >= self._window:
                break
            if locator.key not in seen:
                seen.add(locator.key)
                out.append(locator)
        return out

    def close(self) -> None:
        self._closed = True
