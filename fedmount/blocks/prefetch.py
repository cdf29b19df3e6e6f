"""Reads and read-ahead: turn file reads into block reads, fetch each block once, stay ahead.

# Design

A `FileReader` serves one open file handle. A read at ``(offset, size)`` walks the
file's segments from the one holding `offset` (`File.segments_from`: two bisections,
then one step per segment, so a read costs the pieces it reads whatever the size of the
file) and asks each block for its pieces from the `BlockReader`, which answers from the
block cache (memory chunk or disk file) or, on a miss, from Keep. Consecutive pieces in
one block within 1 MiB of each other (a file of many small segments) are one block read,
at most ``RUN_PIECES`` of them, and the reader yields to the other FUSE requests between
block reads once it held it for ``YIELD_AFTER``, so no read holds it for long. The pieces are joined in order;
a `BlockError` on any of them is raised as is (the FUSE layer turns it into EIO; its
message says which block and services).

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
it is read. The blocks ahead are found by one forward scan of the file's segments that
is kept across reads and looks at most ``SCAN_AHEAD`` segments per block change, so a
file of many small segments is scanned once, not once per read.

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
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING

import trio

from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import Locator
from fedmount.arvados.routes import KeepRoute
from fedmount.stats import Stats

from .admission import Admission
from .cache import BlockCache, Reservation
from .keep import KeepClient, probe_order

if TYPE_CHECKING:
    from fedmount.arvados.manifest import File, Segment

log = logging.getLogger("fedmount.prefetch")

MiB = 1 << 20
SEEK_BACK_TOLERANCE = 1 * MiB
SEEK_AHEAD_TOLERANCE = 16 * MiB
TRACKED = 256  # prefetched blocks remembered for the used/wasted accounting
DEFAULT_PREFETCH_BLOCKS = 8  # blocks a sequential reader's window grows to
INITIAL_WINDOW = 4  # blocks a fresh sequential reader keeps fetched ahead
PEEK = 64 << 10  # a handle's first read smaller than this (not reaching EOF) prefetches nothing
CHUNK_READAHEAD = 16  # cache chunks (1 MiB) a sequential reader has verified ahead of it
MERGE_SPAN = 1 * MiB  # a read's pieces of one block within this span are one block read
RUN_PIECES = 4096  # pieces one block read answers at most (the trio thread's stretch per read)
SCAN_AHEAD = 4096  # segments a block change may scan for the next blocks to prefetch
SEEN = 1024  # block keys the read-ahead scan remembers, not to queue one twice
YIELD_AFTER = 0.005  # seconds a read of many pieces holds the trio thread before it yields


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


class _Run:
    """Consecutive pieces of one read that lie in one block within `MERGE_SPAN` of each other:
    one block read answers them all."""

    __slots__ = ("segment", "at", "lo", "hi", "pieces", "contiguous")

    def __init__(self, segment: Segment, start: int, take: int, at: int):
        self.segment = segment  # of its first piece (the block, and the stream it is in)
        self.at = at  # file offset of its first piece
        self.lo, self.hi = start, start + take  # the block range its pieces span
        self.pieces = [(start, take)]  # block offset and length, in file order
        self.contiguous = True  # each piece starts where the one before ended

    def add(self, segment: Segment, start: int, take: int) -> bool:
        """Take the next piece of the read if it is in this block and close enough."""
        first = self.segment
        if segment.block_index != first.block_index or segment.stream is not first.stream:
            return False
        lo, hi = min(self.lo, start), max(self.hi, start + take)
        if hi - lo > MERGE_SPAN or len(self.pieces) >= RUN_PIECES:
            return False
        self.contiguous = self.contiguous and start == self.hi
        self.lo, self.hi = lo, hi
        self.pieces.append((start, take))
        return True

    def place(self, data: bytes | bytearray | memoryview, out: bytearray, offset: int) -> None:
        """Copy the run's pieces out of `data` (its block range) into `out` (a read from `offset`)."""
        at = self.at - offset
        view = memoryview(data)
        for start, take in self.pieces:
            out[at : at + take] = view[start - self.lo : start - self.lo + take]
            at += take


class _Lookahead:
    """The distinct blocks after a sequential reader's position, for read-ahead: a forward scan
    of the file's segments that is kept across reads, so that each segment is looked at once
    (from the last seek on), never once per read, and at most `SCAN_AHEAD` per block change."""

    def __init__(self, file: File, stream_blocks: int):
        self._file = file
        self._size = file.size
        self._stream_blocks = stream_blocks  # blocks of the stream after the file, at most
        self._segments: Iterator[Segment] | None = None
        self._scanned_to = 0  # file offset up to which segments were scanned
        self._ahead: deque[tuple[int, Locator]] = deque()  # (file offset where first met, block)
        self._seen: OrderedDict[str, None] = OrderedDict()  # keys met, the last `SEEN`

    def blocks(self, position: int, current: str, count: int) -> list[Locator]:
        """The next `count` distinct blocks after `position` (in block `current`): the file's
        own, then the ones after it in its last segment's stream."""
        if self._segments is None or self._scanned_to < position:  # a fresh start or a jump ahead
            self._segments = self._file.segments_from(position)
            self._scanned_to = position
            self._ahead.clear()
            self._seen.clear()
        self._meet(current)
        while self._ahead and self._ahead[0][0] <= position:
            self._ahead.popleft()
        for _ in range(SCAN_AHEAD):
            if len(self._ahead) >= count:
                break
            segment = next(self._segments, None)
            if segment is None:
                break
            self._scanned_to = segment.file_offset + segment.length
            if self._meet(segment.locator.key):
                self._ahead.append((segment.file_offset, segment.locator))
            if self._scanned_to >= self._size:
                self._add_stream_tail(segment)
        return [locator for _, locator in islice(self._ahead, count)]

    def _add_stream_tail(self, last: Segment) -> None:
        """Queue the blocks after the file's last segment in its stream (the next files)."""
        after = last.block_index + 1
        for locator in last.stream.blocks[after : after + self._stream_blocks]:
            if self._meet(locator.key):
                self._ahead.append((self._scanned_to, locator))

    def _meet(self, key: str) -> bool:
        """Remember `key`; False if it was met already."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        return True


class FileReader:
    """One open file: maps reads to block pieces, detects sequential access, reads ahead.

    Planning costs O(pieces read): a read walks the file's segments from the one holding
    its offset (`File.segments_from`, two bisections), the pieces of one block that lie
    close together are one block read (`_Run`), and the trio thread is given back between
    block reads, so a read of 100,000 one-byte pieces neither walks the rest of the file
    per piece nor keeps the other FUSE requests waiting until it is done."""

    def __init__(self, reader: BlockReader, file: File, route: KeepRoute):
        self._reader = reader
        self._route = route
        self._file = file
        self.size = file.size
        self._next = 0  # where the previous read ended
        self._window = 0  # blocks to keep fetched ahead of the current one
        self._block: str | None = None  # key of the block being read sequentially
        self._lookahead = _Lookahead(file, reader.prefetch_blocks)
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
        ahead = sequential and not peek
        out: bytearray | None = None  # the answer, once it is made of several block reads
        run: _Run | None = None
        after: Segment | None = None  # the first segment after this read
        pos = offset
        held_since = time.perf_counter()
        for segment in self._file.segments_from(offset):
            if pos >= end:
                after = segment
                break
            start = segment.block_offset + pos - segment.file_offset
            take = min(segment.file_offset + segment.length, end) - pos
            if run is None or not run.add(segment, start, take):
                if run is not None:
                    out = out if out is not None else bytearray(end - offset)
                    run.place(await self._read_run(run, sequential, ahead), out, offset)
                    if time.perf_counter() - held_since > YIELD_AFTER:  # let other requests in
                        await trio.lowlevel.checkpoint()
                        held_since = time.perf_counter()
                run = _Run(segment, start, take, pos)
            pos += take
        assert run is not None
        data = await self._read_run(run, sequential, ahead)
        if ahead and after is not None:
            # Close to the end of this piece: the cache loads the next block's start from disk.
            near = after.file_offset - end < CHUNK_READAHEAD * MiB
            if near and after.locator.key != run.segment.locator.key:
                self._reader.preload(after.locator, after.block_offset, CHUNK_READAHEAD * MiB)
        if out is None and run.contiguous:
            return data
        out = out if out is not None else bytearray(end - offset)
        run.place(data, out, offset)
        return out

    async def _read_run(self, run: _Run, sequential: bool, ahead: bool) -> bytes | bytearray | memoryview:
        if ahead:
            self._advance(run)
        return await self._reader.read(
            run.segment.locator, self._route, run.lo, run.hi - run.lo, sequential=sequential
        )

    def _advance(self, run: _Run) -> None:
        """A sequential reader is at `run`: grow the window on a new block, prefetch."""
        key = run.segment.locator.key
        if key == self._block:
            return
        self._block = key
        self._window = min(self._reader.prefetch_blocks, max(self._reader.initial_window, self._window * 2))
        self._reader.stats.set("prefetch_depth", self._window)
        if not self._closed:
            for locator in self._lookahead.blocks(run.at, key, self._window):
                self._reader.prefetch(locator, self._route)

    def close(self) -> None:
        self._closed = True
