"""The block cache: a memory tier of verified 1 MiB chunks over a disk tier of block files.

The memory tier is the daemon's; the disk tier is one directory per user, shared by that
user's mounts and commands on the host.

Content addressing. Entries are keyed by `Locator.key` (``hash+size``): the same block
reached through any collection, cluster, signature or ``+R`` hint is one entry, and every
process of one user on the host (a workstation mount, a container's mount, `fedmount
stage`) shares it. Only blocks whose md5 matched their locator are ever stored (keep.py
verifies them).

The parts. `BlockCache` is what the read path needs of a cache (this module's Protocol);
`TieredCache` composes the tiers: memory.py (chunks of blocks fetched into memory),
disk.py (block files, mappings, chunk verification) over index.py (the SQLite index: LRU,
access times, pins with owners), format.py (the block-file format), ownership.py (who may
share a directory), files.py (unnamed files, leases) and config.py (directory and bounds).

Writing: a transaction. A fetch calls ``txn = await cache.begin(key, size)``, has Keep
receive the block into ``txn.buffer`` (the mapping of its future block file when the disk
tier can make one, else a plain buffer), then ``await txn.commit()`` once the md5 matched,
or ``txn.abort()``. Commit stores the block: a block in a plain buffer goes to the memory
tier as zero-copy views of it and is written to a block file; a block received into its
file gets its trailer and its name (disk.py, "Filling") and is read back from the disk
tier, each chunk checked once. Then, if the disk tier exceeds its bound, the least
recently used unpinned blocks are evicted (index.py). `put` stores a block already in
hand (a stage) the same way.

Reading. `read` answers from memory when every chunk of the range is there; else from the
block file, once the chunks of the range are verified (disk.py, "Reading"): a read that
needs a chunk being verified waits for that verification instead of repeating it, a range
of verified chunks is served without a worker thread, and the rest is verified in one,
except the chunks of a small read of an open block that are all in the page cache, which the
trio thread verifies itself (disk.py, `verify_resident`).

Verify-ahead. Checking a chunk costs a worker-thread hop and a page fault per page; a
sequential reader passes ``verify_ahead=N``, and when its read ends in chunk i, chunks
i+1..i+N are verified in the background (one task covers every chunk of the range not yet
verified or being verified, and starts once half of the range is missing, so each hop
verifies several chunks; a read that verifies in the foreground takes `EXTRA_CHUNKS` more).
`verify_ahead(key, offset, length)` does the same for the start of the next block, so a
reader crossing into it does not wait while its file is opened, mapped and checked. This
is the cache's own grain; the read-ahead of whole blocks is readahead.py's.

Leases. A watcher task checks the open blocks' leases every `LEASE_POLL` seconds and
discards a block whose lease another process is breaking (``cache_corrupt``, one warning),
so that process can go on (disk.py, "Leases").

Holds. `hold` keeps a block from eviction from the last tier (the disk, or memory without
one) until `release`; admission.py holds the blocks being read and keeps the held bytes
within `capacity`.

Degrading. If the directory cannot be created or written (read-only, no space,
permissions) or cannot be trusted (ownership.py), the cache logs exactly one warning, with
what to do about it, and continues memory-only. A corrupt block file (bad length, trailer
or chunk) is a miss: the file is deleted, ``cache_corrupt`` counted, one warning logged,
and the caller fetches the block again. Corrupt bytes are never returned.

Why not `diskcache` for the block bytes: its ``set`` of 64 MiB values was slower than
write+rename of a plain file, a lookup with LRU bookkeeping costs a SQLite write per
access, and it has no pinning and no per-chunk integrity. diskcache is itself "plain files
+ SQLite"; this package keeps that shape with the index the cache needs.

All disk I/O, hashing and SQLite access run in worker threads (`trio.to_thread`) except
`pin`/`unpin`/`pins_of`/`cached_bytes`, which are small synchronous calls meant for
start-up and command-line tools, and `Transaction.abort`. ``directory=None`` selects
`default_cache_dir()`; ``disk_limit=0`` disables the disk tier.

Stats: ``cache_hits``/``cache_hit_bytes`` (label tier: ram or disk), ``cache_misses``,
``cache_miss_bytes``, ``cache_evictions``, ``cache_corrupt``, ``cache_degraded``, the gauges
``cache_disk_bytes`` and ``cache_ram_bytes``.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Protocol

import trio

from fedmount.stats import Stats

from .config import CacheConfig, default_cache_dir
from .disk import CorruptBlock, DiskTier, Reservation
from .format import CHUNK, chunk_count, key_size
from .index import CORRUPT_INDEX, INDEX, NO_OWNER
from .memory import MemoryTier
from .ownership import UntrustedDirectory

log = logging.getLogger("fedmount.cache")

EXTRA_CHUNKS = 2  # chunks a sequential read verifies per hop, beyond the ones asked for
SMALL_READ = 128 * 1024  # random reads up to this size are one non-blocking pread of their bytes
LEASE_POLL = 0.5  # seconds between checks for leases another process is breaking

Bytes = bytes | bytearray | memoryview


class Transaction:
    """One block being written: receive it into `buffer`, then `commit` (md5 matched) or `abort`."""

    def __init__(self, cache: TieredCache, key: str, buffer: memoryview, reservation: Reservation | None):
        self.key = key
        self.buffer = buffer  # writable, the block's size
        self._cache = cache
        self._reservation = reservation  # the block file it is received into, if any
        self._open = True

    async def commit(self) -> None:
        """Store the verified block in `buffer` (see "Writing" in the module docstring)."""
        assert self._open, "a transaction ends once"
        self._open = False
        await self._cache._store(self.key, self.buffer, self._reservation)

    def abort(self) -> None:
        """The fetch failed: drop what it received (nothing happens after `commit`)."""
        if self._open:
            self._open = False
            if self._reservation is not None:
                self._reservation.abort()


class BlockCache(Protocol):
    """What the read path (fetcher.py, admission.py) needs of a block cache."""

    @property
    def capacity(self) -> int: ...
    async def read(self, key: str, offset: int, length: int, *, verify_ahead: int = 0) -> Bytes | None: ...
    async def begin(self, key: str, size: int) -> Transaction: ...
    def cached_bytes(self, key: str) -> int: ...
    def verify_ahead(self, key: str, offset: int, length: int) -> None: ...
    def hold(self, key: str) -> None: ...
    def release(self, key: str) -> None: ...
    def usage(self) -> tuple[int, int]: ...


class TieredCache:
    """The memory tier over the disk tier of one directory (see the module docstring)."""

    def __init__(self, directory: str | None, disk_limit: int, ram_limit: int, stats: Stats | None = None):
        self._stats = stats if stats is not None else Stats()
        self._hits = {  # per tier: the read path's hit and hit-bytes series, bound once
            tier: (
                self._stats.counter("cache_hits", tier=tier),
                self._stats.counter("cache_hit_bytes", tier=tier),
            )
            for tier in ("ram", "disk")
        }
        self._disk_limit = disk_limit
        self._memory = MemoryTier(ram_limit, self._stats)
        self._disk_bytes = 0  # on disk after this process's last store (the index's total then)
        self._loading: dict[tuple[str, int], trio.Event] = {}  # chunks of block files being verified
        self._held: set[str] = set()  # blocks being read: never evicted (see "Holds")
        self._disk: DiskTier | None = None
        self._degraded = False
        self._watching: trio.lowlevel.TrioToken | None = None  # the run whose lease watcher is started
        if disk_limit > 0:
            directory = directory if directory is not None else default_cache_dir()
            try:
                self._disk = DiskTier(directory)
            except (OSError, sqlite3.Error, UntrustedDirectory) as exc:
                self._degrade(directory, exc)

    @classmethod
    def configured(cls, config: CacheConfig, stats: Stats | None = None) -> TieredCache:
        return cls(config.directory, config.disk_limit, config.ram_limit, stats)

    @property
    def directory(self) -> str | None:
        """The disk tier's directory, or None when running memory-only."""
        return self._disk.directory if self._disk is not None else None

    @property
    def capacity(self) -> int:
        """Bytes the cache holds: its disk bound with a disk tier, else its memory bound."""
        return self._disk_limit if self._disk is not None else self._memory.limit

    def usage(self) -> tuple[int, int]:
        """(capacity, bytes used) of the last tier, for statfs."""
        return self.capacity, self._disk_bytes if self._disk is not None else self._memory.used

    def hold(self, key: str) -> None:
        """Never evict this block (from the disk tier, or from memory without one) until `release`."""
        self._held.add(key)

    def release(self, key: str) -> None:
        self._held.discard(key)

    def _degrade(self, directory: str, exc: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        if isinstance(exc, UntrustedDirectory):
            log.warning(
                "block cache: refusing %s: %s, so someone else could plant wrong blocks in it; continuing "
                "with the memory cache only; use a directory only you can write (chmod 700 it, or "
                "--disk-cache-dir elsewhere)",
                directory, exc,
            )  # fmt: skip
        else:
            log.warning(
                "block cache: cannot use %s (%s); continuing with the memory cache only; %s",
                directory, exc, _advice(directory, exc),
            )  # fmt: skip
        self._disk = None
        self._stats.set("cache_degraded", 1)

    # reading -----------------------------------------------------------------------

    async def read(self, key: str, offset: int, length: int, *, verify_ahead: int = 0) -> Bytes | None:
        """Bytes [offset, offset+length) of the block (clipped to its size), or None on a miss.

        A read within one chunk of a fetched block, or within verified chunks of a block file,
        is a read-only view (no copy). ``verify_ahead=N`` (sequential readers) has the N chunks
        after this read verified in the background."""
        size = key_size(key)
        end = min(size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // CHUNK, (end - 1) // CHUNK
        chunks = [self._memory.get(key, i) for i in range(first, last + 1)]
        if None not in chunks:
            out = _join(chunks, first, offset, end)
            tier = "ram"
        elif self._disk is None:
            return self._miss(length)
        else:
            disk = self._disk
            tier = "ram"  # verified chunks of a mapped file are read at memory speed
            for i in range(first, last + 1) if self._loading else ():
                loading = self._loading.get((key, i))
                if loading is not None:
                    await loading.wait()
                    tier = "disk"
            small = not verify_ahead and end - offset <= SMALL_READ  # see disk.py, "Reading"
            out = disk.ready(key, offset, end, small=small)
            if out is None and small and self._resident(disk, key, first, last):
                out = disk.ready(key, offset, end, small=True)
            if out is not None and not isinstance(out, memoryview):
                tier = "disk"
            if out is None:
                hi = last + (EXTRA_CHUNKS if verify_ahead else 0)
                out = await self._verify(key, first, hi, serve=(offset, end))
                if out is None:
                    return self._miss(length)
                tier = "disk"
        hits, hit_bytes = self._hits[tier]
        hits.add()
        hit_bytes.add(len(out))
        if verify_ahead and self._disk is not None:
            self._schedule(key, last + 1, min(chunk_count(size), last + 1 + verify_ahead))
        return out

    @staticmethod
    def _resident(disk: DiskTier, key: str, first: int, last: int) -> bool:
        """Verify chunks first..last of an open block on the trio thread, if their pages are in the
        page cache (disk.py, `verify_resident`); False if that cannot be done without waiting or a
        chunk failed (then `_verify` checks it again, and discards the block)."""
        try:
            return disk.verify_resident(key, first, last) is not None
        except CorruptBlock:
            return False

    async def _verify(
        self, key: str, lo: int, hi: int, mark: trio.Event | None = None, serve: tuple[int, int] | None = None
    ) -> memoryview | bytearray | bool | None:
        """Verify chunks lo..hi (inclusive, clipped) of the block file in a worker thread: bytes
        `serve` (offset, end) of it if asked, else True; None if it is not on disk, is corrupt
        (then discarded) or cannot be read.

        Chunks not already being verified are marked with `mark` (a new event by default)
        meanwhile, so that concurrent reads of them wait for this instead of repeating it."""
        disk = self._disk
        assert disk is not None
        if self._watching is not trio.lowlevel.current_trio_token():  # block files get opened (leased)
            self._watch(disk)
        hi = min(hi, chunk_count(key_size(key)) - 1)
        mine = mark if mark is not None else self._mark(key, lo, hi)

        def work() -> memoryview | bytearray | bool | None:
            block = disk.verify(key, lo, hi)
            if block is None:
                return None
            return True if serve is None else disk.serve(key, block, *serve)

        try:
            return await trio.to_thread.run_sync(work)
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

    def verify_ahead(self, key: str, offset: int, length: int) -> None:
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
        verified, in_memory, loading = self._disk.verified(key), self._memory.slots, self._loading
        todo = [
            i
            for i in range(lo, hi)
            if i not in verified and (key, i) not in in_memory and (key, i) not in loading
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

    def _watch(self, disk: DiskTier) -> None:
        """Start the task that withdraws blocks whose lease another process breaks (once per run)."""
        self._watching = trio.lowlevel.current_trio_token()
        if disk.leases:
            trio.lowlevel.spawn_system_task(self._watch_leases, disk, name="block cache leases")

    async def _watch_leases(self, disk: DiskTier) -> None:
        """Every `LEASE_POLL` seconds: a block whose file another process opened to write or truncate
        is discarded, which lets its mapping go and with it the lease, so that process goes on."""
        while self._disk is disk:
            await trio.sleep(LEASE_POLL)
            for key in disk.breaking():
                await self._corrupt(key, CorruptBlock("another process opened it to write or truncate it"))

    def _miss(self, length: int) -> None:
        self._stats.add("cache_misses")
        self._stats.add("cache_miss_bytes", length)
        return None

    async def _corrupt(self, key: str, exc: BaseException) -> None:
        self._stats.add("cache_corrupt")
        log.warning("block cache: discarding corrupt cache file for block %s (%s)", key, exc)
        self._memory.drop(key)
        if self._disk is not None:
            await trio.to_thread.run_sync(self._disk.discard, key)

    # writing -----------------------------------------------------------------------

    async def begin(self, key: str, size: int) -> Transaction:
        """A transaction for a fetch of the block (see "Writing"): its buffer is the mapping of a new
        block file when the disk tier can make one, else a plain buffer."""
        if size != key_size(key):
            raise ValueError(f"block {key}: size {size}")
        disk = self._disk
        if disk is not None and size > 0:
            try:
                reservation = await trio.to_thread.run_sync(disk.reserve, key)
            except OSError as exc:
                log.debug("block cache: cannot reserve %s (%s); writing it after the fetch", key, exc)
            else:
                return Transaction(self, key, reservation.buffer, reservation)
        return Transaction(self, key, memoryview(bytearray(size)), None)

    async def put(self, key: str, data: Bytes) -> None:
        """Store a verified block already in hand (len(data) must match the key's size)."""
        if len(data) != key_size(key):
            raise ValueError(f"block {key}: got {len(data)} bytes")
        await self._store(key, memoryview(data), None)

    async def _store(self, key: str, data: memoryview, reservation: Reservation | None) -> None:
        view = data.toreadonly()
        disk = self._disk
        if disk is None and reservation is not None:
            reservation.abort()  # now nobody can open its file: its mapping is safe to keep
            reservation = None
        if reservation is None:  # a block file's mapping is kept only under its lease
            self._memory.put_block(key, view, self._held if disk is None else ())
        if disk is None:
            return
        try:
            evicted, total = await trio.to_thread.run_sync(self._disk_store, disk, key, view, reservation)
        except (OSError, sqlite3.Error) as exc:
            self._degrade(disk.directory, exc)
            return
        self._disk_bytes = total
        self._stats.add("cache_evictions", evicted)
        self._stats.set("cache_disk_bytes", total)

    def _disk_store(
        self, disk: DiskTier, key: str, view: memoryview, reservation: Reservation | None
    ) -> tuple[int, int]:
        if reservation is not None:
            disk.commit(reservation)
        elif not disk.contains(key):
            disk.write(key, view)
        return disk.evict(self._disk_limit, keep=self._held | {key})

    def cached_bytes(self, key: str) -> int:
        """How many bytes of the block this cache holds (the whole size if it is on disk)."""
        if self._disk is not None and self._disk.contains(key):
            return key_size(key)
        return self._memory.cached_bytes(key)

    # pins --------------------------------------------------------------------------

    def pin(self, keys: Iterable[str], owner: str = NO_OWNER, names: Sequence[str] = ()) -> None:
        """Never evict these blocks, in any process sharing the directory, until `owner` unpins them
        (index.py); `names` are other names of the owner, for `pins_of`."""
        if self._disk is not None:
            self._disk.index.pin(keys, owner, names)

    def unpin(self, keys: Iterable[str], owner: str = NO_OWNER) -> list[str]:
        """Release `owner`'s pins and the ownerless pins of `keys`; the keys no longer pinned."""
        if self._disk is None:
            return list(keys)
        return self._disk.index.unpin(keys, owner)

    def pins_of(self, name: str) -> tuple[str, list[str]] | None:
        """(owner, keys) of the owner named or known as `name`, or None."""
        return self._disk.index.pins_of(name) if self._disk is not None else None

    def pinned(self) -> set[str]:
        return self._disk.index.pinned() if self._disk is not None else set()


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


def _advice(directory: str, exc: BaseException) -> str:
    """What to do about a cache directory that cannot be used, for the one warning."""
    code = getattr(exc, "sqlite_errorcode", None)
    errno_ = exc.errno if isinstance(exc, OSError) else None
    if errno_ in (errno.ENOSPC, errno.EDQUOT) or code == sqlite3.SQLITE_FULL:
        return "free space there or pick another directory with --disk-cache-dir"
    if errno_ in (errno.EROFS, errno.EACCES, errno.EPERM) or code == sqlite3.SQLITE_READONLY:
        return "pick a writable directory with --disk-cache-dir"
    if code in CORRUPT_INDEX:
        index = os.path.join(directory, INDEX)
        return f"remove {index} (it is rebuilt from the block files) or pick another --disk-cache-dir"
    return "pick another directory with --disk-cache-dir"


__all__ = ["BlockCache", "CacheConfig", "TieredCache", "Transaction"]
