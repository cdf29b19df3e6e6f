"""The host-wide block cache: a memory tier of verified 1 MiB chunks over a disk tier of block files.

Content addressing. Entries are keyed by `Locator.key` (``hash+size``): the same block
reached through any collection, cluster, signature or ``+R`` hint is one entry, and every
mount on the host (a workstation mount, a container's mount, `fedmount stage`) shares it.
Only blocks whose md5 matched their locator are ever `put` (keep.py verifies them).

Disk tier (``<dir>/blocks/<hash[:2]>/<hash>+<size>``). A block file holds the block's bytes
at offset 0, then a trailer: one xxh3-64 per 1 MiB chunk (little-endian u64), the block
size (u64) and an 8-byte magic. A block file is written as ``<file>.tmp.<pid>.<suffix>``
and renamed into place, so readers in any process see either no file or a whole one, and two
processes writing the same block race harmlessly (same content). Reads never load a
block: a hot block's file is mapped (``mmap``, read-only, shared) and a read is a view of
the mapping, which the FUSE reply copies straight out of the page cache; each 1 MiB chunk's
xxh3 is checked the first time this process reads it (measured here: xxh3-64 14.9 GB/s,
crc32 3.4 GB/s, md5 0.6 GB/s; the md5 is paid once, on insert; crc32 would add ~0.3 ms per
MiB to every first read, xxh3 ~0.07 ms). A file whose length or trailer is wrong
(truncated, foreign) or a chunk whose checksum differs (bit flip) makes the block a miss:
the file is deleted, ``cache_corrupt`` counted, one warning logged, and the caller fetches
the block again from Keep. Corrupt bytes are never returned.

Filling. A block fetched from Keep is received straight into its future cache file: the
fetch asks for a `Reservation` (a new temporary file, ``posix_fallocate``'d to the block's
size plus trailer so that a full disk fails here with ENOSPC instead of as a SIGBUS later,
and mapped writable and shared), the transport receives the body into the mapping, and once
the md5 matched `put` writes the trailer into the mapping and renames the file into place.
The bytes reach the page cache once, by the socket receive, instead of being received into
an anonymous buffer (zero-filled first) and then copied by ``write``: perf of a cold remote
read had that ``write`` at 25% of the daemon's CPU. A fetch that fails abandons its
reservation (the file is unlinked). Without a disk tier, or when the file cannot be made,
the fetch receives into a plain buffer and `put` writes it.

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

Memory tier. An LRU of verified 1 MiB chunks of fetched blocks keyed by ``(key, chunk
index)``: a fresh `put` lands there as zero-copy views of the block (of its reservation's
mapping when it was received into one), bounded by ``ram_limit`` bytes (with
``disk_limit=0`` this is the only tier).

Reading block files. The ``OPEN_FILES`` most recently read block files stay open, with the
set of their chunks this process verified, and the ``MAPPED_BLOCKS`` most recently read of
them are also mapped (a block is mapped again, without verifying anything again, when it
is read after leaving that smaller LRU: its file is never rewritten in place). A chunk is
verified (its xxh3 against the trailer) by a worker thread, which also faults its pages
in; once verified, a read of any range of verified chunks is a read-only view of the
mapping, made on the trio thread without a copy (and without a system call, unless the
block must be mapped again); a range spanning chunks is one view too: the mapping is
contiguous. This replaced ``preadv`` into reused page-aligned buffers: in a warm
sequential read the copy out of the page cache was 27% of the daemon's CPU (perf; the FUSE
reply's own copy 22%) and the buffers' recycling made every view valid only until the next
await. A view of a mapping is valid as long as it is referenced (it keeps the mapping
alive after the block leaves the LRU, and after an eviction unlinks the file). Files are
never written in place (write + rename), so a mapped file never shrinks under a reader.
The mapped pages of the blocks being read count in the daemon's RSS (file-backed, clean,
reclaimable: at most ``MAPPED_BLOCKS`` blocks), and a page the kernel evicted after its
chunk was verified is faulted back in by the reply (a disk read on the trio thread; a
sequential reader's chunks are verified just before use).

A small random read (up to ``SMALL_READ``) of verified chunks is served with one
``preadv(RWF_NOWAIT)`` of just its bytes instead (the kernel answers EAGAIN rather than
wait for a disk, so a page evicted long after verification never blocks the trio thread).

A sequential reader passes ``readahead=N``: when its read ends in chunk i, chunks
i+1..i+N are verified in the background (a load covers every chunk of the range not yet
verified or being verified, and starts once half of the range is missing, so each worker
thread hop verifies several chunks). `preload` does the same for the start of the next
block, so a reader crossing into it does not wait. A read that needs a chunk being
verified waits for that load instead of verifying it again.

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
command-line tools, and `Reservation.abandon` (one unlink, on a failed fetch).
``directory=None`` selects `default_cache_dir()`; ``disk_limit=0`` disables the disk tier.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
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
READ_AHEAD_CHUNKS = 2  # chunks a sequential read verifies per hop, beyond the ones asked for
SMALL_READ = 128 * 1024  # random reads up to this size are one non-blocking pread of their bytes
DIGEST = xxhash.xxh3_64_intdigest
MAGIC = b"FMBLK\x01\x00\x00"
OPEN_FILES = 64  # block files kept open per process, with the chunks verified
MAPPED_BLOCKS = 8  # of those, the ones kept mapped (their touched pages count in RSS)
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


@dataclass
class Reservation:
    """A block's future cache file, mapped writable, for a fetch to receive the block into."""

    key: str
    tmp: str  # the temporary file, renamed into place by `BlockCache.put`, unlinked by `abandon`
    buffer: memoryview  # writable, the block's size: what the fetch fills
    mapping: mmap.mmap  # block + trailer; lives as long as views of it do

    def abandon(self) -> None:
        """The fetch failed: remove the temporary file."""
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class CorruptBlock(Exception):
    """A block file failed its length, trailer or chunk checksum."""


@dataclass
class _OpenBlock:
    file: object  # the open file (an io.FileIO): closed when the last reference goes away
    fd: int
    inode: int
    size: int
    sums: tuple[int, ...]
    mapping: memoryview | None = None  # read-only, the block's bytes; lives while views of it do
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
        self._mapped: OrderedDict[str, _OpenBlock] = OrderedDict()  # the open blocks with a mapping
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

    def reserve(self, key: str) -> Reservation:
        """A new temporary file for the block, its space allocated, mapped writable (see "Filling")."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
        size = key_size(key)
        length = size + trailer_length(size)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, length)
            mapping = mmap.mmap(fd, length)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return Reservation(key, tmp, memoryview(mapping)[:size], mapping)

    def commit(self, reservation: Reservation) -> None:
        """Write the trailer of a filled reservation and move its file into place."""
        size = len(reservation.buffer)
        try:
            reservation.mapping[size:] = trailer(reservation.buffer)
            os.rename(reservation.tmp, self.path(reservation.key))
        except BaseException:
            reservation.abandon()
            raise
        self._sql("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (reservation.key, size, time.time()))

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

    def mapped(self, key: str, block: _OpenBlock) -> memoryview:
        """A read-only view of the whole block, mapping its file if it is not mapped now."""
        with self._open_lock:
            if block.mapping is None:
                block.mapping = memoryview(
                    mmap.mmap(block.fd, block.size, prot=mmap.PROT_READ) if block.size else b""
                )
            self._mapped[key] = block
            self._mapped.move_to_end(key)
            while len(self._mapped) > MAPPED_BLOCKS:
                self._mapped.popitem(last=False)[1].mapping = None  # unmapped once no view is left
            return block.mapping

    def verify(self, key: str, first: int, last: int) -> _OpenBlock | None:
        """Open and map the block if needed and check chunks first..last (clipped) not yet verified
        by this process, faulting their pages in; the open block, or None if it is not on disk.

        Runs in a worker thread (it reads the disk). Raises `CorruptBlock` on a bad chunk."""
        block = self._opened(key)
        if block is None:
            return None
        data = self.mapped(key, block)
        for i in range(first, min(last, chunk_count(block.size) - 1) + 1):
            if i not in block.verified:
                if DIGEST(data[i * CHUNK : (i + 1) * CHUNK]) != block.sums[i]:
                    raise CorruptBlock(f"chunk {i} failed its checksum")
                block.verified.add(i)
        now = time.time()
        if now - block.touched > TOUCH_INTERVAL:
            block.touched = now
            self._sql(
                "INSERT INTO blocks VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET atime=?",
                (key, block.size, now, now),
            )
        return block

    def _ready(self, key: str, first: int, last: int) -> _OpenBlock | None:
        """The open block if chunks first..last are verified and its access time is fresh, else None."""
        with self._open_lock:
            block = self._open.get(key)
            if block is not None:
                self._open.move_to_end(key)
        if block is None or time.time() - block.touched > TOUCH_INTERVAL:
            return None
        verified = block.verified
        if not all(i in verified for i in range(first, last + 1)):
            return None
        return block

    def verified(self, key: str) -> set[int] | frozenset[int]:
        """The chunks of the block this process has verified (empty if it is not open)."""
        with self._open_lock:
            block = self._open.get(key)
        return block.verified if block is not None else frozenset()

    def view(self, key: str, offset: int, end: int) -> memoryview | None:
        """A read-only view of bytes [offset, end) of the mapped block if every chunk they touch is
        verified (and its access time fresh); None otherwise. No system call, no copy."""
        block = self._ready(key, offset // CHUNK, (end - 1) // CHUNK)
        return None if block is None else self.mapped(key, block)[offset:end]

    def read_verified(self, key: str, offset: int, length: int) -> bytearray | None:
        """Bytes of an open block whose chunks this process has verified, straight from the
        page cache, without waiting for anything; None when that cannot be done.

        For small random reads: copying whole 1 MiB chunks to serve 4 KiB costs more than
        the read itself, and a verified chunk needs no second check."""
        block = self._ready(key, offset // CHUNK, (offset + length - 1) // CHUNK)
        if block is None:
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
            self._mapped.pop(key, None)
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
                self._mapped.pop(key, None)
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
        self._loading: dict[tuple[str, int], trio.Event] = {}  # chunks of block files being verified
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
        """A chunk of a fetched block from memory, or None."""
        slot = (key, index)
        chunk = self._ram.get(slot)
        if chunk is not None:
            self._ram.move_to_end(slot)
        return chunk

    # public API --------------------------------------------------------------------

    async def read(
        self, key: str, offset: int, length: int, *, readahead: int = 0
    ) -> bytes | bytearray | memoryview | None:
        """Bytes [offset, offset+length) of the block (clipped to its size), or None on a miss.

        A read within one chunk of a fetched block, or within verified chunks of a block file,
        is a read-only view (no copy). ``readahead=N`` (sequential readers) has the N chunks
        after this read verified in the background."""
        size = key_size(key)
        end = min(size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // CHUNK, (end - 1) // CHUNK
        chunks = [self._chunk(key, i) for i in range(first, last + 1)]
        if None not in chunks:
            out = self._join(chunks, first, offset, end)
            tier = "ram"
        elif self._disk is None:
            return self._miss(length)
        else:
            disk = self._disk
            tier = "ram"  # verified chunks of a mapped file are read at memory speed
            for i in range(first, last + 1):
                loading = self._loading.get((key, i))
                if loading is not None:
                    await loading.wait()
                    tier = "disk"
            out = None
            if not readahead and end - offset <= SMALL_READ:  # see "Reading block files"
                out = disk.read_verified(key, offset, end - offset)
                tier = "disk" if out is not None else tier
            if out is None:
                out = disk.view(key, offset, end)
            if out is None:
                block = await self._verify(key, first, last + (READ_AHEAD_CHUNKS if readahead else 0))
                if block is None:
                    return self._miss(length)
                out, tier = disk.mapped(key, block)[offset:end], "disk"
        self._stats.add("cache_hits", tier=tier)
        self._stats.add("cache_hit_bytes", len(out), tier=tier)
        if readahead and self._disk is not None:
            self._schedule(key, last + 1, min(chunk_count(size), last + 1 + readahead))
        return out

    @staticmethod
    def _join(chunks: list, first: int, offset: int, end: int) -> bytes | memoryview:
        """[offset, end) out of consecutive chunks from `first`: a view if it lies in one."""
        base = first * CHUNK
        if len(chunks) == 1:
            return memoryview(chunks[0])[offset - base : end - base]
        pieces = []
        for i, chunk in enumerate(chunks, first):
            lo, hi = max(offset, i * CHUNK) - i * CHUNK, min(end, (i + 1) * CHUNK) - i * CHUNK
            pieces.append(chunk[lo:hi])
        return b"".join(pieces)

    async def _verify(self, key: str, lo: int, hi: int, mark: trio.Event | None = None) -> _OpenBlock | None:
        """Verify chunks lo..hi (inclusive, clipped) of the block file in a worker thread: the open
        block, or None if it is not on disk, is corrupt (then discarded) or cannot be read.

        Chunks not already being verified are marked with `mark` (a new event by default)
        meanwhile, so that concurrent reads of them wait for this instead of repeating it."""
        assert self._disk is not None
        hi = min(hi, chunk_count(key_size(key)) - 1)
        mine = mark if mark is not None else self._mark(key, lo, hi)
        try:
            return await trio.to_thread.run_sync(self._disk.verify, key, lo, hi)
        except CorruptBlock as exc:
            await self._corrupt(key, exc)
            return None
        except OSError as exc:
            log.warning("block cache: reading %s failed (%s); fetching it again", key, exc)
            return None
        finally:
            for slot in [(key, i) for i in range(lo, hi + 1)]:
                if self._loading.get(slot) is mine:
                    del self._loading[slot]
            mine.set()

    def _mark(self, key: str, lo: int, hi: int) -> trio.Event:
        """Mark chunks lo..hi not already being verified as being verified, with a new event."""
        event = trio.Event()
        for i in range(lo, hi + 1):
            self._loading.setdefault((key, i), event)
        return event

    def preload(self, key: str, offset: int, length: int) -> None:
        """Verify the chunks holding [offset, offset+length) of a block in the background, if it
        is on disk and they are neither in memory, verified nor being verified (a reader about
        to cross into the block)."""
        if self._disk is not None:
            size = key_size(key)
            self._schedule(key, offset // CHUNK, min(chunk_count(size), (offset + length - 1) // CHUNK + 1))

    def _schedule(self, key: str, lo: int, hi: int) -> None:
        """Verify chunks [lo, hi) that are neither in memory, verified nor being verified, in the
        background. Starts once at least half of the range is missing, so each worker-thread hop
        verifies several chunks."""
        assert self._disk is not None
        verified = self._disk.verified(key)
        todo = [
            i
            for i in range(lo, hi)
            if i not in verified and (key, i) not in self._ram and (key, i) not in self._loading
        ]
        if not todo or (len(todo) < (hi - lo + 1) // 2 and hi < chunk_count(key_size(key))):
            return  # enough is ahead already: verify in batches, not one chunk per thread hop
        lo, hi = todo[0], todo[-1]
        mark = self._mark(key, lo, hi)  # now: a read arriving before the task starts waits for it
        trio.lowlevel.spawn_system_task(self._background_verify, key, lo, hi, mark, name=f"verify {key}")

    async def _background_verify(self, key: str, lo: int, hi: int, mark: trio.Event) -> None:
        try:
            await self._verify(key, lo, hi, mark)
        except Exception:  # a bug must not take the daemon down; the foreground read retries
            log.exception("block cache: background verification of %s failed", key)

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
        if self._disk is not None:
            await trio.to_thread.run_sync(self._disk.discard, key)

    async def reserve(self, key: str) -> Reservation | None:
        """A mapped temporary cache file for a fetch of the block to receive into (see "Filling"),
        or None: no disk tier, an empty block, or the file cannot be made (then `put` writes)."""
        disk = self._disk
        if disk is None or key_size(key) == 0:
            return None
        try:
            return await trio.to_thread.run_sync(disk.reserve, key)
        except OSError as exc:
            log.debug("block cache: cannot reserve %s (%s); writing it after the fetch", key, exc)
            return None

    async def put(
        self, key: str, data: bytes | bytearray | memoryview, reservation: Reservation | None = None
    ) -> None:
        """Store a verified block (len(data) must match the key's size) in both tiers; `data` is
        `reservation.buffer` when the fetch received into one."""
        if len(data) != key_size(key):
            raise ValueError(f"block {key}: got {len(data)} bytes")
        if reservation is not None and data is not reservation.buffer:  # filled elsewhere: never commit it
            reservation.abandon()
            reservation = None
        view = memoryview(data).toreadonly()
        for index in range(chunk_count(len(view))):
            self._ram_put(key, index, view[index * CHUNK : (index + 1) * CHUNK])
        disk = self._disk
        if disk is None:
            if reservation is not None:
                reservation.abandon()
            return
        try:
            evicted, total = await trio.to_thread.run_sync(self._disk_put, disk, key, view, reservation)
        except (OSError, sqlite3.Error) as exc:
            self._degrade(disk.directory, exc)
            return
        self._stats.add("cache_evictions", evicted)
        self._stats.set("cache_disk_bytes", total)

    def _disk_put(
        self, disk: _DiskTier, key: str, view: memoryview, reservation: Reservation | None
    ) -> tuple[int, int]:
        if reservation is not None:
            disk.commit(reservation)
        elif not disk.contains(key):
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
