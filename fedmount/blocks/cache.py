"""The host-wide block cache: a memory tier of verified 1 MiB chunks over a disk tier of block files.

Content addressing. Entries are keyed by `Locator.key` (``hash+size``): the same block
reached through any collection, cluster, signature or ``+R`` hint is one entry, and every
mount on the host (a workstation mount, a container's mount, `fedmount stage`) shares it.
Only blocks whose md5 matched their locator are ever `put` (keep.py verifies them).

Disk tier (``<dir>/blocks/<hash[:2]>/<hash>+<size>``). A block file holds the block's bytes
at offset 0, then a trailer: one xxh3-64 per 1 MiB chunk (little-endian u64), the block
size (u64) and an 8-byte magic. A `put` writes ``<file>.tmp.<pid>.<thread>`` and renames
it into place, so readers in any process see either no file or a whole one, and two
processes writing the same block race harmlessly (same content). Reads never load a
block: they ``os.pread`` the 1 MiB chunks a request touches from a file descriptor kept
open per hot block, and check each chunk's xxh3 the first time this process reads it
(measured here: xxh3-64 14.9 GB/s, crc32 3.4 GB/s, md5 0.6 GB/s; the md5 is paid once,
on insert; crc32 would add ~0.3 ms per MiB to every first read, xxh3 ~0.07 ms). A file
whose length or trailer is wrong (truncated, foreign) or a chunk whose checksum differs
(bit flip) makes the block a miss: the file is deleted, ``cache_corrupt`` counted, one
warning logged, and the caller fetches the block again from Keep. Corrupt bytes are
never returned.

Index and eviction. A small SQLite database (``<dir>/index.sqlite3``, WAL mode, shared by
every process using the directory) records each block's size and last-access time, and
the set of pinned keys. After a `put`, if the blocks' total size exceeds ``disk_limit``,
the least recently used unpinned blocks are deleted inside one write transaction, so two
processes never over- or double-evict. Access times are written when a process first
reads a block and then at most once a minute per block, not on every read. A process
that still has an evicted file open keeps reading it safely (POSIX unlink semantics).
`pin`/`unpin` persist in the index, so a block pinned by `fedmount stage --pin` survives
restarts and is never evicted by any process until unpinned.

Why not `diskcache` for the block bytes: measured here with 64 MiB values, its ``set``
ran at 0.47 GB/s against 0.69 GB/s for write+rename of a plain file, a lookup with LRU
bookkeeping cost ~114 us (a SQLite write per access) against ~9 us for a 128 KiB
``pread``, and it has no pinning and no per-chunk integrity. diskcache is itself
"plain files + SQLite"; this module keeps that shape with the index the cache needs.

Memory tier. Two LRUs of verified 1 MiB chunks keyed by ``(key, chunk index)``:

- fetched blocks: a fresh `put` lands there as zero-copy views of the block, bounded by
  ``ram_limit`` bytes (with ``disk_limit=0`` this is the only tier);
- staged disk chunks: what was read from a block file, at most ``STAGED_CHUNKS``, in
  page-aligned anonymous buffers (``mmap``) that are reused once their chunk leaves the
  LRU. Reuse is the point: the kernel's copy into freshly allocated memory ran at
  ~1.4 GB/s here (page faults), into reused memory at 8-13 GB/s; and a ``bytearray``'s
  data sits 16 bytes past a page boundary, where the copy out of the page cache ran 4-6x
  slower than into page-aligned memory (4K aliasing on this CPU). The page cache already
  holds these bytes, so there is no point keeping more than a read-ahead window of them.
  Up to ``FREE_BUFFERS`` spare buffers wait for reuse, enough for one load of a whole
  read-ahead window: with 8 spares a fresh 256 MiB sequential read still mapped ~44 new
  buffers (and unmapped as many), with 16 about 5, and its CPU time fell by ~15%. A new
  buffer is mapped with ``MAP_POPULATE`` (pages in one call instead of 256 faults during
  the first ``preadv``): in-process CPU for a fresh 256 MiB read 113-123 -> 85-97 ms.

A chunk is read from disk with one ``preadv`` per span of chunks, into staged buffers.
When the block file is already open and the span is in the page cache, the read happens
right on the trio thread with ``RWF_NOWAIT`` (the kernel answers EAGAIN instead of
waiting for a disk; a few hundred microseconds per 8 MiB, no thread hop); otherwise, or
to open the file, a worker thread does it. Each chunk's xxh3 is checked the first time
this process reads it (a per-open-block set of verified chunks), never again. A read
that lies within one chunk returns a read-only view of it, copying nothing; a read
spanning chunks copies their pieces once (``b"".join``). There is no await between
finding a staged chunk and returning, but a staged buffer is reused once its chunk leaves
the LRU, so a view of one is valid only until the caller's next await: the caller hands
it on synchronously (FUSE: pyfuse3 copies the reply out of it before the handler's task
can yield, see fs/fuse.py) or copies it (``bytes``) before awaiting anything.
A small random read (up to ``SMALL_READ``) of chunks already verified is served with one
non-blocking ``preadv`` of just its bytes, not a copy of whole chunks.

A sequential reader passes ``readahead=N``: when its read ends in chunk i, chunks
i+1..i+N are loaded in the background (a load covers every chunk of the range not yet
in memory or being loaded, and starts once half of the range is missing, so each load
reads several chunks). `preload` does the same for the start of the next block, so a
reader crossing into it does not wait. A read that needs a chunk being loaded waits for
that load instead of reading it again.

Degrading. If the directory cannot be created or written (read-only, no space,
permissions), the cache logs exactly one warning and continues memory-only.

Size. Every process that writes to a directory evicts down to its own ``disk_limit``, so
the processes sharing one (a mount, `fedmount stage`, `fedmount-run`) should agree on it.
When no size is given they all use `default_disk_cache_size`, arv-mount's rule
(sdk/python/arvados/keep.py): the smaller of 10% of the filesystem's size and 25% of its
available space, where "available" counts the bytes this cache already holds (from the
index) as available, so the bound does not shrink as the cache fills; at least
`MIN_DISK_CACHE`.

All disk I/O, hashing and SQLite access run in worker threads (`trio.to_thread`) except
`pin`/`unpin`/`cached_bytes`, which are small synchronous calls meant for start-up and
command-line tools. ``directory=None`` selects `default_cache_dir()`; ``disk_limit=0``
disables the disk tier.
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio
import xxhash

from fedmount.stats import Stats

log = logging.getLogger("fedmount.cache")

CHUNK = 1 << 20
READ_AHEAD_CHUNKS = 2  # chunks a sequential read takes from disk per hop, beyond the ones asked for
SMALL_READ = 128 * 1024  # random reads up to this size skip the chunk copy once a chunk is verified
STAGED_CHUNKS = 24  # chunks read from disk kept in memory (in reused buffers)
FREE_BUFFERS = 16  # chunk buffers kept for reuse: a full read-ahead load (prefetch.CHUNK_READAHEAD)
DIGEST = xxhash.xxh3_64_intdigest
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE  # one mmap call, not 256 faults
MAGIC = b"FMBLK\x01\x00\x00"
OPEN_FILES = 64  # block files kept open per process
TOUCH_INTERVAL = 60.0  # seconds between access-time updates of one block
MIN_DISK_CACHE = 64 << 20  # the smallest default disk bound: one full-size Keep block


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedmount")


def default_disk_cache_size(directory: str | None = None) -> int:
    """The disk tier's bound when none is given (see "Size" in the module docstring).

    Creates `directory` (default `default_cache_dir()`) so that the filesystem it will live
    on is the one measured; `MIN_DISK_CACHE` if it cannot be created or measured."""
    directory = directory if directory is not None else default_cache_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        vfs = os.statvfs(directory)
    except OSError:
        return MIN_DISK_CACHE
    index = os.path.join(directory, "index.sqlite3")
    held = 0
    if os.path.exists(index):
        try:
            db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=60)
            try:
                held = db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            held = 0
    size = min(vfs.f_blocks * vfs.f_frsize // 10, (vfs.f_bavail * vfs.f_frsize + held) // 4)
    return max(size, MIN_DISK_CACHE)


def key_size(key: str) -> int:
    """The block size from a ``hash+size`` key."""
    return int(key.partition("+")[2])


def chunk_count(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


def trailer(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3 of every 1 MiB chunk, the size and the magic: what follows the bytes in a block file."""
    view = memoryview(data)
    sums = [DIGEST(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK)]
    return struct.pack(f"<{len(sums)}Q", *sums) + struct.pack("<Q", len(view)) + MAGIC


def trailer_length(size: int) -> int:
    return 8 * chunk_count(size) + 8 + len(MAGIC)


class CorruptBlock(Exception):
    """A block file failed its length, trailer or chunk checksum."""


@dataclass
class _OpenBlock:
    file: object  # the open file (an io.FileIO): closed when the last reference goes away
    fd: int
    inode: int
    size: int
    sums: tuple[int, ...]
    verified: set[int] = field(default_factory=set)
    touched: float = 0.0


class _DiskTier:
    """Block files plus the SQLite index; every method runs in a worker thread."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(os.path.join(directory, "blocks"), mode=0o700, exist_ok=True)
        index = os.path.join(directory, "index.sqlite3")
        self._db = sqlite3.connect(index, timeout=60, isolation_level=None, check_same_thread=False)
        self._db_lock = threading.Lock()
        with self._db_lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS blocks "
                "(key TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS blocks_atime ON blocks(atime)")
            self._db.execute("CREATE TABLE IF NOT EXISTS pins (key TEXT PRIMARY KEY)")
        self._open: OrderedDict[str, _OpenBlock] = OrderedDict()
        self._open_lock = threading.Lock()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, "blocks", key[:2], key)

    def _sql(self, query: str, args: Iterable[object] = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(query, tuple(args)).fetchall()

    def contains(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(trailer(data))
            os.rename(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._sql("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (key, len(data), time.time()))

    def _opened(self, key: str) -> _OpenBlock | None:
        with self._open_lock:
            block = self._open.get(key)
            if block is not None:
                self._open.move_to_end(key)
                return block
        try:
            f = open(self.path(key), "rb", buffering=0)  # kept open in the LRU below
        except FileNotFoundError:
            return None
        size = key_size(key)
        st = os.fstat(f.fileno())
        tail_len = trailer_length(size)
        if st.st_size != size + tail_len:
            f.close()
            raise CorruptBlock(f"file is {st.st_size} bytes, expected {size + tail_len}")
        tail = os.pread(f.fileno(), tail_len, size)
        n = chunk_count(size)
        if tail[-len(MAGIC) :] != MAGIC or struct.unpack_from("<Q", tail, 8 * n)[0] != size:
            f.close()
            raise CorruptBlock("bad trailer")
        block = _OpenBlock(f, f.fileno(), st.st_ino, size, struct.unpack_from(f"<{n}Q", tail))
        with self._open_lock:
            self._open[key] = block
            while len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)
        return block

    def read_chunks(
        self, key: str, first: int, buffers: list[mmap.mmap | None], *, nowait: bool = False
    ) -> list[tuple[memoryview, mmap.mmap]] | None:
        """Chunks first.. (one per buffer, clipped to the block) read into `buffers` and verified.

        One ``preadv`` fills them all; a None buffer is allocated here (in the worker thread,
        which pays for faulting its pages in). Returns (read-only view, buffer) per chunk, or
        None if the block is not on disk.

        ``nowait=True`` is for the trio thread: it raises `BlockingIOError` instead of doing
        anything that could wait for a disk (opening the file, bytes not in the page cache,
        ``RWF_NOWAIT``; an index write; a buffer to allocate)."""
        if nowait:
            with self._open_lock:
                block = self._open.get(key)
            if block is None or None in buffers or time.time() - block.touched > TOUCH_INTERVAL:
                raise BlockingIOError("not ready for a non-blocking read")
        else:
            block = self._opened(key)
            if block is None:
                return None
        count = min(len(buffers), chunk_count(block.size) - first)
        start = first * CHUNK
        bufs = [b if b is not None else mmap.mmap(-1, CHUNK, flags=_MAP_FLAGS) for b in buffers[:count]]
        views = [memoryview(b)[: min(CHUNK, block.size - i * CHUNK)] for i, b in enumerate(bufs, first)]
        want = sum(len(v) for v in views)
        got = os.preadv(block.fd, views, start, os.RWF_NOWAIT if nowait else 0)
        if got != want:
            if nowait:
                raise BlockingIOError("part of the range is not in the page cache")
            raise CorruptBlock(f"short read: {got} of {want} bytes at offset {start}")
        for i, view in enumerate(views, first):
            if i not in block.verified:
                if DIGEST(view) != block.sums[i]:
                    raise CorruptBlock(f"chunk {i} failed its checksum")
                block.verified.add(i)
        now = time.time()
        if now - block.touched > TOUCH_INTERVAL:
            block.touched = now
            self._sql(
                "INSERT INTO blocks VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET atime=?",
                (key, block.size, now, now),
            )
        return [(v.toreadonly(), b) for v, b in zip(views, bufs, strict=True)]

    def read_verified(self, key: str, offset: int, length: int) -> bytearray | None:
        """Bytes of an open block whose chunks this process has verified, straight from the
        page cache, without waiting for anything; None when that cannot be done.

        For small random reads: copying whole 1 MiB chunks to serve 4 KiB costs more than
        the read itself, and a verified chunk needs no second check."""
        with self._open_lock:
            block = self._open.get(key)
        if block is None or time.time() - block.touched > TOUCH_INTERVAL:
            return None
        if not all(i in block.verified for i in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)):
            return None
        buf = bytearray(length)
        try:
            got = os.preadv(block.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:  # not in the page cache (EAGAIN), or RWF_NOWAIT unsupported
            return None
        return buf if got == length else None

    def discard(self, key: str) -> None:
        """Delete a corrupt block file (only the inode this process saw, if it had one open)."""
        with self._open_lock:
            block = self._open.pop(key, None)
        try:
            if block is None or os.stat(self.path(key)).st_ino == block.inode:
                os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        self._sql("DELETE FROM blocks WHERE key = ?", (key,))

    def evict(self, limit: int, keep: str) -> tuple[int, int]:
        """Delete least recently used unpinned blocks until the total is within `limit`.

        Returns (blocks evicted, bytes on disk after eviction)."""
        evicted = []
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]
                if total > limit:
                    rows = self._db.execute(
                        "SELECT key, size FROM blocks WHERE key NOT IN (SELECT key FROM pins) AND key != ? "
                        "ORDER BY atime",
                        (keep,),
                    )
                    for key, size in rows.fetchall():
                        if total <= limit:
                            break
                        evicted.append(key)
                        total -= size
                    self._db.executemany("DELETE FROM blocks WHERE key = ?", [(k,) for k in evicted])
                    for key in evicted:
                        try:
                            os.unlink(self.path(key))
                        except FileNotFoundError:
                            pass
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        with self._open_lock:
            for key in evicted:
                self._open.pop(key, None)
        return len(evicted), total

    def pin(self, keys: Iterable[str]) -> None:
        with self._db_lock:
            self._db.executemany("INSERT OR IGNORE INTO pins (key) VALUES (?)", [(k,) for k in keys])

    def unpin(self, keys: Iterable[str]) -> None:
        with self._db_lock:
            self._db.executemany("DELETE FROM pins WHERE key = ?", [(k,) for k in keys])

    def pinned(self) -> set[str]:
        return {k for (k,) in self._sql("SELECT key FROM pins")}


class BlockCache:
    def __init__(self, directory: str | None, disk_limit: int, ram_limit: int, stats: Stats | None = None):
        self._stats = stats if stats is not None else Stats()
        self._disk_limit = disk_limit
        self._ram_limit = ram_limit
        self._ram: OrderedDict[tuple[str, int], bytes | memoryview] = OrderedDict()
        self._ram_bytes = 0
        # chunks read from disk, in buffers that are reused once the chunk leaves (see "Memory tier")
        self._staged: OrderedDict[tuple[str, int], tuple[memoryview, mmap.mmap]] = OrderedDict()
        self._free: list[mmap.mmap] = []
        self._loading: dict[tuple[str, int], trio.Event] = {}  # chunks being read in the background
        self._disk: _DiskTier | None = None
        self._degraded = False
        if disk_limit > 0:
            directory = directory if directory is not None else default_cache_dir()
            try:
                self._disk = _DiskTier(directory)
            except (OSError, sqlite3.Error) as exc:
                self._degrade(directory, exc)

    @property
    def directory(self) -> str | None:
        """The disk tier's directory, or None when running memory-only."""
        return self._disk.directory if self._disk is not None else None

    def _degrade(self, directory: str, exc: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        log.warning(
            "block cache: cannot use %s (%s); continuing with the memory cache only; free space or pick "
            "another --cache-dir",
            directory,
            exc,
        )
        self._disk = None
        self._stats.set("cache_degraded", 1)

    # memory tier -------------------------------------------------------------------

    def _ram_put(self, key: str, index: int, chunk: bytes | memoryview) -> None:
        slot = (key, index)
        old = self._ram.pop(slot, None)
        if old is not None:
            self._ram_bytes -= len(old)
        self._ram[slot] = chunk
        self._ram_bytes += len(chunk)
        while self._ram_bytes > self._ram_limit and self._ram:
            _, dropped = self._ram.popitem(last=False)
            self._ram_bytes -= len(dropped)
        self._stats.set("cache_ram_bytes", self._ram_bytes)

    def _chunk(self, key: str, index: int) -> bytes | memoryview | None:
        """A chunk from memory (a fetched block's view, or a staged disk chunk), or None."""
        slot = (key, index)
        chunk = self._ram.get(slot)
        if chunk is not None:
            self._ram.move_to_end(slot)
            return chunk
        staged = self._staged.get(slot)
        if staged is not None:
            self._staged.move_to_end(slot)
            return staged[0]
        return None

    def _stage(self, key: str, index: int, view: memoryview, buffer: mmap.mmap) -> None:
        old = self._staged.pop((key, index), None)
        if old is not None:
            self._recycle(old[1])
        self._staged[(key, index)] = (view, buffer)
        while len(self._staged) > STAGED_CHUNKS:
            self._recycle(self._staged.popitem(last=False)[1][1])

    def _recycle(self, buffer: mmap.mmap) -> None:
        if len(self._free) < FREE_BUFFERS:
            self._free.append(buffer)

    # public API --------------------------------------------------------------------

    async def read(
        self, key: str, offset: int, length: int, *, readahead: int = 0
    ) -> bytes | bytearray | memoryview | None:
        """Bytes [offset, offset+length) of the block (clipped to its size), or None on a miss.

        A read within one chunk is a read-only view of it, valid only until the caller's next
        await (see "Memory tier"). ``readahead=N`` (sequential readers) loads the N chunks
        after this read in the background."""
        size = key_size(key)
        end = min(size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // CHUNK, (end - 1) // CHUNK
        chunks = [self._chunk(key, i) for i in range(first, last + 1)]
        tier = "ram"
        if None in chunks:
            if self._disk is None:
                return self._miss(length)
            for i in range(first, last + 1):
                loading = self._loading.get((key, i))
                if loading is not None:
                    await loading.wait()
            # Staged chunks seen before an await may have been recycled since: look again.
            chunks = [self._chunk(key, i) for i in range(first, last + 1)]
            if None in chunks and not readahead and end - offset <= SMALL_READ:
                small = self._disk.read_verified(key, offset, end - offset)
                if small is not None:
                    self._stats.add("cache_hits", tier="disk")
                    self._stats.add("cache_hit_bytes", len(small), tier="disk")
                    return small
            if None in chunks:
                # A sequential reader also gets the next chunks, in the same disk read.
                got = await self._load(key, first, last + (READ_AHEAD_CHUNKS if readahead else 0))
                if got is None:
                    return self._miss(length)
                chunks = got[: last - first + 1]
            tier = "disk"
        # From here to the return there is no await: no staged buffer can be reused under us.
        base = first * CHUNK
        out: memoryview | bytes
        if len(chunks) == 1:  # a view, no copy: valid until the caller's next await
            out = memoryview(chunks[0])[offset - base : end - base]  # type: ignore[arg-type]
        else:
            pieces = []
            for i, chunk in enumerate(chunks, first):
                lo, hi = max(offset, i * CHUNK) - i * CHUNK, min(end, (i + 1) * CHUNK) - i * CHUNK
                pieces.append(chunk[lo:hi])  # type: ignore[index]
            out = b"".join(pieces)
        self._stats.add("cache_hits", tier=tier)
        self._stats.add("cache_hit_bytes", len(out), tier=tier)
        if readahead and self._disk is not None:
            self._schedule(key, last + 1, min(chunk_count(size), last + 1 + readahead))
        return out

    async def _load(self, key: str, lo: int, hi: int) -> list[memoryview] | None:
        """Read chunks lo..hi (inclusive, clipped) from disk into staged buffers; None on a miss.

        Chunks not already being loaded are marked as loading meanwhile, so that concurrent
        reads of them wait for this load instead of starting their own. The views returned
        are valid until the caller's next await."""
        assert self._disk is not None
        count = min(hi, chunk_count(key_size(key)) - 1) - lo + 1
        mine = trio.Event()
        slots = [(key, i) for i in range(lo, lo + count) if (key, i) not in self._loading]
        for slot in slots:
            self._loading[slot] = mine
        buffers: list[mmap.mmap | None] = [self._free.pop() if self._free else None for _ in range(count)]
        try:
            try:
                try:  # from the page cache, right here: no thread hop
                    got = self._disk.read_chunks(key, lo, buffers, nowait=True)
                except OSError:  # would block (or RWF_NOWAIT unsupported): a worker thread does it
                    got = await trio.to_thread.run_sync(self._disk.read_chunks, key, lo, buffers)
            except CorruptBlock as exc:
                await self._corrupt(key, exc)
                return None
            except OSError as exc:
                log.warning("block cache: reading %s failed (%s); fetching it again", key, exc)
                return None
        finally:
            for slot in slots:
                if self._loading.get(slot) is mine:
                    del self._loading[slot]
            mine.set()
        if got is None:
            for buffer in buffers:
                if buffer is not None:
                    self._recycle(buffer)
            return None
        for i, (view, buffer) in enumerate(got, lo):
            self._stage(key, i, view, buffer)
        return [view for view, _ in got]

    def preload(self, key: str, offset: int, length: int) -> None:
        """Load the chunks holding [offset, offset+length) of a block in the background, if it
        is on disk and they are neither in memory nor being loaded (a reader about to cross
        into the block)."""
        if self._disk is not None:
            size = key_size(key)
            self._schedule(key, offset // CHUNK, min(chunk_count(size), (offset + length - 1) // CHUNK + 1))

    def _schedule(self, key: str, lo: int, hi: int) -> None:
        """Load chunks [lo, hi) that are neither in memory nor being loaded, in the background.

        Loads start once at least half of the range is missing, so each worker-thread hop reads
        several chunks."""
        todo = [
            i
            for i in range(lo, hi)
            if (key, i) not in self._ram and (key, i) not in self._staged and (key, i) not in self._loading
        ]
        if not todo or (len(todo) < (hi - lo + 1) // 2 and hi < chunk_count(key_size(key))):
            return  # enough is ahead already: load in batches, not one chunk per thread hop
        done = trio.Event()
        for i in todo:
            self._loading[(key, i)] = done
        trio.lowlevel.spawn_system_task(self._background_load, key, todo, done, name=f"cache load {key}")

    async def _background_load(self, key: str, todo: list[int], done: trio.Event) -> None:
        try:
            await self._load(key, todo[0], todo[-1])
        except Exception:  # a bug must not take the daemon down; the foreground read retries
            log.exception("block cache: background load of %s failed", key)
        finally:
            for i in todo:
                if self._loading.get((key, i)) is done:
                    del self._loading[(key, i)]
            done.set()

    def _miss(self, length: int) -> None:
        self._stats.add("cache_misses")
        self._stats.add("cache_miss_bytes", length)
        return None

    async def _corrupt(self, key: str, exc: BaseException) -> None:
        self._stats.add("cache_corrupt")
        log.warning("block cache: discarding corrupt cache file for block %s (%s)", key, exc)
        for index in range(chunk_count(key_size(key))):
            chunk = self._ram.pop((key, index), None)
            if chunk is not None:
                self._ram_bytes -= len(chunk)
            self._staged.pop((key, index), None)
        if self._disk is not None:
            await trio.to_thread.run_sync(self._disk.discard, key)

    async def put(self, key: str, data: bytes | bytearray) -> None:
        """Store a verified block (len(data) must match the key's size) in both tiers."""
        if len(data) != key_size(key):
            raise ValueError(f"block {key}: got {len(data)} bytes")
        view = memoryview(data).toreadonly()
        for index in range(chunk_count(len(view))):
            self._ram_put(key, index, view[index * CHUNK : (index + 1) * CHUNK])
        disk = self._disk
        if disk is None:
            return
        try:
            evicted, total = await trio.to_thread.run_sync(self._disk_put, disk, key, view)
        except (OSError, sqlite3.Error) as exc:
            self._degrade(disk.directory, exc)
            return
        self._stats.add("cache_evictions", evicted)
        self._stats.set("cache_disk_bytes", total)

    def _disk_put(self, disk: _DiskTier, key: str, view: memoryview) -> tuple[int, int]:
        if not disk.contains(key):
            disk.write(key, view)
        return disk.evict(self._disk_limit, keep=key)

    def cached_bytes(self, key: str) -> int:
        """How many bytes of the block this cache holds (the whole size if it is on disk)."""
        if self._disk is not None and self._disk.contains(key):
            return key_size(key)
        chunks = (self._ram.get((key, i)) for i in range(chunk_count(key_size(key))))
        return sum(len(c) for c in chunks if c is not None)

    def pin(self, keys: Iterable[str]) -> None:
        """Never evict these blocks, in any process sharing the directory, until `unpin`."""
        if self._disk is not None:
            self._disk.pin(keys)

    def unpin(self, keys: Iterable[str]) -> None:
        if self._disk is not None:
            self._disk.unpin(keys)

    def pinned(self) -> set[str]:
        return self._disk.pinned() if self._disk is not None else set()
