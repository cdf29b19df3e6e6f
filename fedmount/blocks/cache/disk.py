"""The disk tier: block files, their mappings, and the verification of their chunks.

Layout: ``<dir>/blocks/<hash[:2]>/<hash>+<size>``, in the format of format.py, listed in
the index (index.py). A block file is written as an unnamed file that gets a name once
whole (files.py), so readers in any process see either no file or a whole one, and two
processes writing the same block race harmlessly (same content).

Filling. A block fetched from Keep is received straight into its future cache file: the
fetch's transaction (`reserve`) is a new temporary file, ``posix_fallocate``'d to the
block's size plus trailer so that a full disk fails there with ENOSPC instead of as a
SIGBUS later, and mapped writable and shared; the transport receives the body into the
mapping, and once the md5 matched `commit` writes the trailer into the mapping, takes a
write lease on the file and links it into place. The bytes reach the page cache once, by
the socket receive, instead of being received into an anonymous buffer (zero-filled
first) and then copied by ``write``. Without leases, or when the file cannot be made, the
fetch receives into a plain buffer and `write` stores it.

Reading. Reads never load a block: the ``OPEN_FILES`` most recently read block files stay
open, with the set of their chunks this process verified, and the ``MAPPED_BLOCKS`` most
recently read of them are also mapped (read-only, shared; a block is mapped again, without
verifying anything again, when it is read after leaving that smaller LRU: its file is
never rewritten in place). `verify` checks a chunk's xxh3 against the trailer the first
time this process reads it (in a worker thread, which also faults its pages in);
`verify_resident` does the same on the trio thread, for a small read, when the block is
open and leased and ``cachestat`` says all the chunk's pages are in the page cache (files.py,
"Residency"): the faults then read no disk, and the hop to a worker thread and back costs
more than the hash of the chunk. Once verified, `ready` serves any range of verified chunks
as a read-only view of the mapping, without a copy (the FUSE reply copies it straight out
of the page cache), once ``cachestat`` said all its pages are in the page cache, so that
this copy faults without waiting for the disk; a range spanning chunks is one view too: the
mapping is contiguous. A range with a page evicted since is served by a worker thread, which
faults the pages back in (`serve`). A view keeps its mapping alive as long as it is
referenced, after the block leaves the LRU and after an eviction unlinks the file. The
mapped pages of the blocks being read count in the daemon's RSS (file-backed, clean,
reclaimable: at most ``MAPPED_BLOCKS`` blocks). Where the kernel has no ``cachestat``
(before Linux 6.5), a small read (the caller's choice) is one ``preadv(RWF_NOWAIT)`` of just
its bytes instead, which answers EAGAIN rather than wait for a disk. A view after its
``cachestat`` costs about what that preadv does; the check is what keeps a large read, too,
from waiting for the disk on the trio thread. A file whose length or trailer is wrong, or a
chunk whose checksum differs, raises `CorruptBlock`: the caller discards the block and
fetches it again. Corrupt bytes are never returned.

Leases. fedmount never writes a block file in place, but someone else may (a careless
``truncate``, a backup tool): pages of a mapping beyond the end of a file that shrank
raise SIGBUS in whatever touches them. So a block file is mapped only while this process
holds a lease on it (``F_RDLCK`` on a file opened to read, ``F_WRLCK`` on a fresh one):
another process that opens it to write or truncates it waits, and `breaking` lists the
blocks whose lease is being broken, for the cache to discard (its mapping goes with the
last view of it, and the lease with the mapping). The same process opening a fresh block
file it holds a write lease on uses the live mapping instead (`_FRESH`). A file that
cannot be leased is read with ``preadv`` into new buffers and checked the same way, chunk
by chunk: a file that shrank is a short read, hence a miss, never a signal.

Every method runs in a worker thread (it may wait for the disk), except `Reservation.abort`
(one unlink, on a failed fetch), `verified`, `verify_resident` and `ready`, which do not wait.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import secrets
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from .files import lease, link_unnamed, new_file, no_follow, publish, remove_dead_temporaries, resident
from .format import (
    CHUNK,
    DIGEST,
    KEY_NAME,
    TEMPORARY_NAME,
    chunk_count,
    key_size,
    parse_trailer,
    trailer,
    trailer_length,
)
from .index import Index
from .ownership import check_ownership, tighten, writers

log = logging.getLogger("fedmount.cache")

OPEN_FILES = 64  # block files kept open per process, with the chunks verified
MAPPED_BLOCKS = 8  # of those, the ones kept mapped (their touched pages count in RSS)
TOUCH_INTERVAL = 60.0  # seconds between access-time updates of one block


@dataclass
class Reservation:
    """A block's future cache file, mapped writable, for a fetch to receive the block into."""

    key: str
    tmp: str | None  # the temporary file's name; None for an unnamed file (O_TMPFILE)
    fd: int  # open until `DiskTier.commit` publishes the file or `abort` drops it; then -1
    buffer: memoryview  # writable, the block's size: what the fetch fills
    mapping: mmap.mmap  # block + trailer; lives as long as views of it do

    def abort(self) -> None:
        """The fetch failed: let the file go (an unnamed one goes with its mapping)."""
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CorruptBlock(Exception):
    """A block file failed its length, trailer or chunk checksum, or cannot be trusted."""


@dataclass
class _OpenBlock:
    file: object  # the open file (an io.FileIO), or None: closed when the last reference goes away
    fd: int
    inode: int
    size: int
    sums: tuple[int, ...]
    leased: bool  # a lease keeps anyone from shrinking the file: it may be mapped
    mapping: memoryview | None = None  # read-only, the block's bytes; lives while views of it do
    verified: set[int] = field(default_factory=set)
    touched: float = 0.0
    transient: bool = False  # a fresh block's mapping, used for one read and never kept


# The mappings of blocks this process received and published, while views of them live: their
# write lease would block this process's own open() of their file.
_FRESH: weakref.WeakValueDictionary[str, mmap.mmap] = weakref.WeakValueDictionary()
_scratch = threading.local()  # per worker thread: one chunk's buffer for verifying a file read by pread


def _scratch_chunk() -> bytearray:
    buf = getattr(_scratch, "chunk", None)
    if buf is None:
        buf = _scratch.chunk = bytearray(CHUNK)
    return buf


def _fault_in(view: memoryview) -> int:
    """Touch one byte of every page of a view of a mapping (it may wait for the disk)."""
    return sum(view[:: mmap.PAGESIZE]) + view[-1] if view else 0


class DiskTier:
    """Block files plus the SQLite index of one directory (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(os.path.join(directory, "blocks"), mode=0o700, exist_ok=True)
        check_ownership(directory)
        tighten(directory)
        self.unnamed, self.leases = self._probe()
        self.index = Index(directory, self._block_files)
        self._open: OrderedDict[str, _OpenBlock] = OrderedDict()
        self._mapped: OrderedDict[str, _OpenBlock] = OrderedDict()  # the open blocks with a mapping
        self._open_lock = threading.Lock()
        self._remove_stale_temporaries()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, "blocks", key[:2], key)

    def _block_files(self) -> Iterable[tuple[str, int, float]]:
        """(key, size, access time) of every block file on disk."""
        for fan in os.scandir(os.path.join(self.directory, "blocks")):
            if fan.is_dir(follow_symlinks=False):
                for entry in os.scandir(fan.path):
                    if KEY_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        yield entry.name, key_size(entry.name), entry.stat(follow_symlinks=False).st_atime

    def _probe(self) -> tuple[bool, bool]:
        """Whether this filesystem makes unnamed files that can be linked, and grants leases."""
        blocks = os.path.join(self.directory, "blocks")
        unnamed = True
        try:
            fd, name = new_file(blocks, ".probe", unnamed=True)
            probe = f"{blocks}/.probe.{secrets.token_hex(4)}"
            try:
                link_unnamed(fd, probe)
                os.unlink(probe)
            finally:
                os.close(fd)
        except OSError:
            unnamed = False
        fd, name = new_file(blocks, ".probe", unnamed=False)
        try:
            leases = lease(fd, fcntl.F_WRLCK)
        finally:
            os.close(fd)
            os.unlink(name)  # type: ignore[arg-type]
        if not leases:
            log.info("block cache: %s grants no file leases; block files are read with pread", self.directory)
        return unnamed, leases

    def _remove_stale_temporaries(self) -> int:
        """Delete the temporary block files of fetches that died (files.py); returns bytes freed."""
        freed = remove_dead_temporaries(os.path.join(self.directory, "blocks"), TEMPORARY_NAME.fullmatch)
        if freed:
            log.info("block cache: removed %d MiB of temporary files left by fetches that died", freed >> 20)
        return freed

    # storing -------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store a block from a plain buffer: a new file, written and then moved into place."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, name = new_file(os.path.dirname(path), key, self.unnamed)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.write(trailer(data))
            publish(fd, name, path)
        except BaseException:
            if name is not None and os.path.exists(name):
                os.unlink(name)
            raise
        finally:
            os.close(fd)
        self.index.stored(key, len(data))

    def reserve(self, key: str) -> Reservation:
        """A new file for the block, its space allocated, mapped writable (see "Filling")."""
        if not self.leases:
            raise OSError(errno.ENOLCK, "the filesystem grants no leases")
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        size = key_size(key)
        length = size + trailer_length(size)
        fd, name = new_file(os.path.dirname(path), key, self.unnamed)
        try:
            if name is not None and not lease(fd, fcntl.F_WRLCK):
                raise OSError(errno.ENOLCK, f"cannot lease {name}")
            os.posix_fallocate(fd, 0, length)
            mapping = mmap.mmap(fd, length)
        except BaseException:
            os.close(fd)
            if name is not None:
                os.unlink(name)
            raise
        return Reservation(key, name, fd, memoryview(mapping)[:size], mapping)

    def commit(self, reservation: Reservation) -> None:
        """Write the trailer of a filled reservation, lease its file and move it into place."""
        size = len(reservation.buffer)
        try:
            reservation.mapping[size:] = trailer(reservation.buffer)
            if reservation.tmp is None and not lease(reservation.fd, fcntl.F_WRLCK):
                self.write(reservation.key, reservation.buffer)  # a copy whose file nobody maps
                reservation.abort()
                return
            publish(reservation.fd, reservation.tmp, self.path(reservation.key))
        except BaseException:
            reservation.abort()
            raise
        reservation.close()  # the mapping keeps the file and its lease as long as views of it live
        _FRESH[reservation.key] = reservation.mapping
        self.index.stored(reservation.key, size)

    # reading -------------------------------------------------------------------------

    def _opened(self, key: str) -> _OpenBlock | None:
        with self._open_lock:
            block = self._open.get(key)
            if block is not None:
                self._open.move_to_end(key)
                return block
        size = key_size(key)
        fresh = _FRESH.get(key)
        if fresh is not None:  # our own write lease on it would block open()
            n = chunk_count(size)
            view = memoryview(fresh)[:size]
            return _OpenBlock(None, -1, -1, size, (), True, view, set(range(n)), time.time(), transient=True)
        path = self.path(key)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block open() forever
                raise CorruptBlock("not a regular file")
            f = open(path, "rb", buffering=0, opener=no_follow)  # kept open in the LRU below
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or writers(st):
                raise CorruptBlock(f"the file belongs to uid {st.st_uid} (mode {stat.S_IMODE(st.st_mode):o})")
            leased = self.leases and lease(f.fileno(), fcntl.F_RDLCK)
            st = os.fstat(f.fileno())
            tail_len = trailer_length(size)
            if st.st_size != size + tail_len:
                raise CorruptBlock(f"file is {st.st_size} bytes, expected {size + tail_len}")
            sums = parse_trailer(os.pread(f.fileno(), tail_len, size), size)
            if sums is None:
                raise CorruptBlock("bad trailer")
        except BaseException:
            f.close()
            raise
        block = _OpenBlock(f, f.fileno(), st.st_ino, size, sums, leased)
        with self._open_lock:
            self._open[key] = block
            while len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)
        return block

    def mapped(self, key: str, block: _OpenBlock) -> memoryview:
        """A read-only view of the whole block of a leased file, mapping it if it is not mapped now."""
        assert block.leased
        if block.transient:
            assert block.mapping is not None
            return block.mapping
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
        """Open (and, if leased, map) the block if needed and check chunks first..last (clipped) not
        yet verified by this process, faulting their pages in; the open block, or None if it is not
        on disk. Raises `CorruptBlock` on a bad chunk, or when the file of an unleased block shrank."""
        block = self._opened(key)
        if block is None:
            return None
        todo = self._unverified(block, first, last)
        self._check(block, self.mapped(key, block) if block.leased and todo else None, todo)
        now = time.time()
        if now - block.touched > TOUCH_INTERVAL:
            block.touched = now
            self.index.touched(key, block.size, now)
        return block

    def verify_resident(self, key: str, first: int, last: int) -> _OpenBlock | None:
        """`verify` without waiting, for the trio thread: chunks first..last (clipped) of an open,
        leased block whose access time is fresh and whose pages are all in the page cache are
        checked through its mapping, which faults without reading the disk (a 1 MiB chunk costs
        about its hash, less than a hop to a worker thread and back). The open block, or None
        when that cannot be done without waiting. Raises `CorruptBlock` like `verify`."""
        with self._open_lock:
            block = self._open.get(key)
        if block is None or not block.leased or time.time() - block.touched > TOUCH_INTERVAL:
            return None
        todo = self._unverified(block, first, last)
        if todo:
            start, end = todo[0] * CHUNK, min(block.size, (todo[-1] + 1) * CHUNK)
            if not resident(block.fd, start, end - start):
                return None
            self._check(block, self.mapped(key, block), todo)
        return block

    @staticmethod
    def _unverified(block: _OpenBlock, first: int, last: int) -> list[int]:
        """Chunks first..last (clipped to the block) this process has not verified."""
        last = min(last, chunk_count(block.size) - 1)
        return [i for i in range(first, last + 1) if i not in block.verified]

    @staticmethod
    def _check(block: _OpenBlock, data: memoryview | None, todo: list[int]) -> None:
        """Check chunks `todo` against the trailer, through the mapping `data` or else by preadv."""
        for i in todo:
            length = min(CHUNK, block.size - i * CHUNK)
            if data is not None:
                chunk: memoryview = data[i * CHUNK : i * CHUNK + length]
            else:  # no lease: read it, so that a file shrinking under us is a short read, not SIGBUS
                chunk = memoryview(_scratch_chunk())[:length]
                if os.preadv(block.fd, [chunk], i * CHUNK) != length:
                    raise CorruptBlock("the file shrank")
            if DIGEST(chunk) != block.sums[i]:
                raise CorruptBlock(f"chunk {i} failed its checksum")
            block.verified.add(i)

    def serve(self, key: str, block: _OpenBlock, offset: int, end: int) -> memoryview | bytearray:
        """Bytes [offset, end) of a verified block: a view of its mapping if it is leased, else read.
        Raises `CorruptBlock` if the file shrank."""
        if block.leased:
            view = self.mapped(key, block)[offset:end]
            _fault_in(view)  # here, in the worker thread, rather than in the FUSE reply's copy
            return view
        buf = bytearray(end - offset)
        if os.preadv(block.fd, [buf], offset) != len(buf):
            raise CorruptBlock("the file shrank")
        return buf

    def _ready(self, key: str, first: int, last: int) -> _OpenBlock | None:
        """The open block if chunks first..last are verified and its access time is fresh, else None."""
        with self._open_lock:
            block = self._open.get(key)
            if block is not None:
                self._open.move_to_end(key)
        if block is None or time.time() - block.touched > TOUCH_INTERVAL:
            return None
        return block if block.verified.issuperset(range(first, last + 1)) else None

    def verified(self, key: str) -> set[int] | frozenset[int]:
        """The chunks of the block this process has verified (empty if it is not open)."""
        with self._open_lock:
            block = self._open.get(key)
        return block.verified if block is not None else frozenset()

    def ready(self, key: str, offset: int, end: int, *, small: bool) -> memoryview | bytearray | None:
        """Bytes [offset, end) of an open block whose chunks this process has verified (and whose
        access time is fresh), without waiting for anything; None when that cannot be done.

        A view of the mapping of a block this process has just published (`_FRESH`: its pages
        were written here moments ago) or of a leased block whose pages are all in the page cache (files.py,
        `resident`), None if one is not; where the kernel cannot tell, a view for a large read
        and a ``preadv(RWF_NOWAIT)`` copy of just the bytes for a `small` one. The same copy for
        an unleased block."""
        block = self._ready(key, offset // CHUNK, (end - 1) // CHUNK)
        if block is None:
            fresh = _FRESH.get(key)  # just received and published here: md5-verified, its write lease ours
            return memoryview(fresh)[offset:end].toreadonly() if fresh is not None else None
        if block.leased:
            cached = resident(block.fd, offset, end - offset)
            if cached is False:
                return None  # a page left the page cache: a worker thread faults it back (`serve`)
            if cached or not small:
                return self.mapped(key, block)[offset:end]
        buf = bytearray(end - offset)
        try:
            got = os.preadv(block.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:  # not in the page cache (EAGAIN), or RWF_NOWAIT unsupported
            return None
        return buf if got == len(buf) else None  # short: not all in the page cache, or the file shrank

    def breaking(self) -> list[str]:
        """Open blocks whose read lease another process is breaking: it opened the file to write or
        truncate it."""
        with self._open_lock:
            leased = [(key, block) for key, block in self._open.items() if block.leased]
        out = []
        for key, block in leased:  # `block` keeps its file open: the fd cannot be reused meanwhile
            try:
                held = fcntl.fcntl(block.fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
            except OSError:
                held = False
            if not held:
                out.append(key)
        return out

    # removing ------------------------------------------------------------------------

    def discard(self, key: str) -> None:
        """Delete a corrupt block file (only the inode this process saw, if it had one open)."""
        with self._open_lock:
            block = self._open.pop(key, None)
            self._mapped.pop(key, None)
        _FRESH.pop(key, None)
        try:
            if block is None or os.stat(self.path(key)).st_ino == block.inode:
                os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        self.index.forget(key)

    def evict(self, limit: int, keep: set[str] | frozenset[str]) -> tuple[int, int]:
        """Delete least recently used blocks, neither pinned nor in `keep`, until the total is
        within `limit` (index.py). Returns (blocks evicted, bytes on disk after eviction)."""

        def remove(key: str) -> None:
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass

        evicted, total = self.index.evict(limit, keep, remove)
        with self._open_lock:
            for key in evicted:
                self._open.pop(key, None)
                self._mapped.pop(key, None)
        return len(evicted), total
