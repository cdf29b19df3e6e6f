"""Read-ahead: turn one open file's reads into block reads, and keep the next blocks coming.

# Reads

A `FileReader` serves one open file handle. A read at ``(offset, size)`` walks the
file's segments from the one holding `offset` (`File.segments_from`: two bisections,
then one step per segment, so a read costs the pieces it reads whatever the size of the
file; a file of at most ``KEPT_SEGMENTS`` segments, the common big file of whole 64 MiB
blocks, has them listed once per handle and found by one bisection, without making a
segment per read) and asks each block for its pieces from the `BlockReader` (fetcher.py), which
answers from the block cache or, on a miss, from Keep. Consecutive pieces in one block
within ``MERGE_SPAN`` of each other (a file of many small segments) are one block read
(`_Run`), at most ``RUN_PIECES`` of them, and the reader yields to the other FUSE requests
between block reads once it held the trio thread for ``YIELD_AFTER``, so no read holds it
for long. The pieces are joined in order; a `BlockError` on any of them is raised as is
(the FUSE layer turns it into EIO; its message says which block and services).

A read is not copied on its way through: a read within one block comes back as the
cache's read-only view (of the block file's mapping, or of one chunk of a block fetched
into memory), a read of a block just fetched as a view of the fetched bytes; the FUSE
adapter hands it to pyfuse3, which copies it into the reply. A read made of several
pieces (it crosses a block boundary) joins them.

# Sequential detection and the window

Like mountpoint-s3's prefetcher, the reader keeps the offset where the previous read
ended. A read that starts there, or slightly off it (up to ``SEEK_BACK_TOLERANCE`` back or
``SEEK_AHEAD_TOLERANCE`` ahead: the kernel's own readahead and parallel FUSE requests do
not arrive in perfect order), is sequential; anything else is a seek and resets the
window to 0. A file's first read at offset 0 counts as sequential.

The window is counted in blocks. A sequential reader that moves into a new block sets it
to ``max(initial_window, 2 * window)``, at most ``read_ahead_blocks``: with the defaults a
fresh reader keeps 4 blocks fetched ahead at once and 8 from its second block on. The
start is wide on purpose. Keep serves one block per connection, and a remote cluster is
typically bound per connection (latency, a per-flow bandwidth cap, one keepstore disk):
a reader that starts at 1 and doubles (1, 2, 4, ...) never has the parallelism the link
offers while it reads the first few blocks, and a 4-block file is over before the window
is open. Locally, several blocks in flight also let the cores hash several blocks at once.

One exception keeps probes cheap: a handle's first read that is smaller than ``PEEK``
and does not reach the end of the file is a *peek* (``head``, ``file``, a 1-byte
time-to-first-byte probe; the kernel asks 16-32 KiB for those, and 512 KiB or more for
``cat``, ``md5sum`` or ``dd``). A peek fetches only its own block, alone, so that block
arrives as fast as the link allows and nothing is spent on blocks nobody may read; the
reader's next sequential read opens the window. A small file read whole (the read
reaches its end) is not a peek: the blocks after it in the stream are the next files of
its directory.

Growth per block rather than per request keeps the per-read cost at a bisect and a dict
lookup (arv-mount had to evaluate its read-ahead only every 128th read because it was
per-request, #21639), and a 64 MiB block is long enough for the next one to arrive while
it is read. The blocks ahead are found by one forward scan of the file's segments that is
kept across reads and looks at most ``SCAN_AHEAD`` segments per block change (`_Lookahead`),
so a file of many small segments is scanned once, not once per read.

# What is read ahead

The blocks that follow the current one *in the stream*, not just in the file: the file's
own later segments first, then ``segment.stream.blocks[segment.block_index + 1:]``.
Arvados packs many small files into one 64 MiB block and writes files of a directory one
after the other, so reading one file of a directory warms the next files too, and the
block holding the next file is often already in memory when it is opened. The manifest
gives the exact block list up front: no guessing about object sizes, no Range requests
past the end. Each block of the window is handed to `BlockReader.read_ahead`, which fetches
it unless it is in flight, cached, or over the fetcher's limits.

Blocks already on the disk cache need no fetch, but their chunks must be checked before
they are served: a sequential read has the cache verify the next ``VERIFY_AHEAD_CHUNKS``
1 MiB chunks of its block ahead of it (the cache's verify-ahead), and a read within that
many MiB of the end of its block has the cache verify the start of the file's next block,
so a remount reading warm data does not stall at each block boundary while the next block
file is opened, mapped and checked.

Stats: ``read_ahead_depth`` (gauge: the window of the most recently advanced reader).
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Protocol

import trio

from fedmount import defaults
from fedmount.arvados.ids import Locator
from fedmount.arvados.routes import KeepRoute
from fedmount.stats import Stats

if TYPE_CHECKING:
    from fedmount.arvados.manifest import File, Segment

MiB = 1 << 20
SEEK_BACK_TOLERANCE = 1 * MiB
SEEK_AHEAD_TOLERANCE = 16 * MiB
DEFAULT_READ_AHEAD_BLOCKS = defaults.READ_AHEAD_BLOCKS  # blocks a sequential reader's window grows to
INITIAL_WINDOW = 4  # blocks a fresh sequential reader keeps fetched ahead
PEEK = 64 << 10  # a handle's first read smaller than this (not reaching EOF) reads nothing ahead
VERIFY_AHEAD_CHUNKS = 16  # cache chunks (1 MiB) a sequential reader has verified ahead of it
MERGE_SPAN = 1 * MiB  # a read's pieces of one block within this span are one block read
RUN_PIECES = 4096  # pieces one block read answers at most (the trio thread's stretch per read)
SCAN_AHEAD = 4096  # segments a block change may scan for the next blocks to read ahead
SEEN = 1024  # block keys the read-ahead scan remembers, not to queue one twice
YIELD_AFTER = 0.005  # seconds a read of many pieces holds the trio thread before it yields
KEPT_SEGMENTS = 64  # a file of at most this many segments has them listed once per handle


class BlockSource(Protocol):
    """What a `FileReader` reads blocks from: the fetcher's `BlockReader`."""

    read_ahead_blocks: int
    initial_window: int
    stats: Stats

    async def read(
        self, locator: Locator, route: KeepRoute, offset: int, length: int, *, sequential: bool = False
    ) -> bytes | bytearray | memoryview: ...
    def read_ahead(self, locator: Locator, route: KeepRoute) -> None: ...
    def verify_ahead(self, locator: Locator, offset: int, length: int) -> None: ...


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

    def __init__(self, reader: BlockSource, file: File, route: KeepRoute):
        self._reader = reader
        self._route = route
        self._file = file
        self.size = file.size
        self._next = 0  # where the previous read ended
        self._window = 0  # blocks to keep fetched ahead of the current one
        self._block: str | None = None  # key of the block being read sequentially
        self._lookahead = _Lookahead(file, reader.read_ahead_blocks)
        self._fresh = True  # no read yet: the first one may be a peek
        self._closed = False
        self._kept: tuple[list[int], list[Segment]] | None = None  # (file offsets, segments), few
        self._many = False  # more than `KEPT_SEGMENTS` segments: walk them per read

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
        pos = offset
        held_since = time.perf_counter()
        segments = self._segments_from(offset)
        for segment in segments:
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
            if pos >= end:
                break
        assert run is not None
        data = await self._read_run(run, sequential, ahead)
        after = next(segments, None) if ahead else None  # the first segment after this read
        if after is not None:
            # Close to the end of this piece: the cache loads the next block's start from disk.
            near = after.file_offset - end < VERIFY_AHEAD_CHUNKS * MiB
            if near and after.locator.key != run.segment.locator.key:
                self._reader.verify_ahead(after.locator, after.block_offset, VERIFY_AHEAD_CHUNKS * MiB)
        if out is None and run.contiguous:
            return data
        out = out if out is not None else bytearray(end - offset)
        run.place(data, out, offset)
        return out

    def _segments_from(self, offset: int) -> Iterator[Segment]:
        """The file's segments from the one holding `offset` (see "Reads")."""
        if self._kept is None and not self._many:
            listed = list(islice(self._file.segments_from(0), KEPT_SEGMENTS + 1))
            self._many = len(listed) > KEPT_SEGMENTS
            if not self._many:
                self._kept = ([segment.file_offset for segment in listed], listed)
        if self._kept is None:
            return self._file.segments_from(offset)
        starts, listed = self._kept
        return map(listed.__getitem__, range(max(bisect_right(starts, offset) - 1, 0), len(listed)))

    async def _read_run(self, run: _Run, sequential: bool, ahead: bool) -> bytes | bytearray | memoryview:
        if ahead:
            self._advance(run)
        return await self._reader.read(
            run.segment.locator, self._route, run.lo, run.hi - run.lo, sequential=sequential
        )

    def _advance(self, run: _Run) -> None:
        """A sequential reader is at `run`: grow the window on a new block, read ahead."""
        key = run.segment.locator.key
        if key == self._block:
            return
        self._block = key
        self._window = min(self._reader.read_ahead_blocks, max(self._reader.initial_window, self._window * 2))
        self._reader.stats.set("read_ahead_depth", self._window)
        if not self._closed:
            for locator in self._lookahead.blocks(run.at, key, self._window):
                self._reader.read_ahead(locator, self._route)

    def close(self) -> None:
        self._closed = True
