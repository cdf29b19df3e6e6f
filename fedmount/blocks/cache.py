"""The host-wide block cache: a memory tier of verified 1 MiB chunks over a disk tier of block files.

Content addressing. Entries are keyed by `Locator.key` (``hash+size``): the same block
reached through any collection, cluster, signature or ``+R`` hint is one entry, and every
process of one user on the host (a workstation mount, a container's mount, `fedmount
stage`) shares it. Only blocks whose md5 matched their locator are ever `put` (keep.py
verifies them).

Who may share a cache directory. The xxh3 trailer below detects damage, not malice: it is
not keyed, so whoever can write the directory can plant a block file with wrong bytes and
a right trailer. So a directory is used only if it, its ``blocks/`` fan-out, its index and
every parent belong to this user (parents may belong to root) and nobody else can write
them (a sticky parent such as /tmp is fine: others cannot rename entries they do not
own); otherwise (`check_ownership`) the cache logs one line and runs memory-only. A block
file that belongs to someone else, or that others may write, is discarded when opened.
Directories are made 0700 and files 0600 (the index too, before SQLite opens it: SQLite
gives its -wal and -shm the mode of the database). One directory therefore serves one
user; the guarantee (every byte served is the block's) holds for that user's processes,
and root's processes need a directory of their own.

Disk tier (``<dir>/blocks/<hash[:2]>/<hash>+<size>``). A block file holds the block's bytes
at offset 0, then a trailer: one xxh3-64 per 1 MiB chunk (little-endian u64), the block
size (u64) and an 8-byte magic. A block file is written as an unnamed file (``O_TMPFILE``)
that gets a name once whole (see "Temporary files"), so readers in any process see either
no file or a whole one, and two processes writing the same block race harmlessly (same
content). Reads never load a
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
the md5 matched `put` writes the trailer into the mapping, takes a write lease on the file
(see "Leases") and links it into place.
The bytes reach the page cache once, by the socket receive, instead of being received into
an anonymous buffer (zero-filled first) and then copied by ``write``: perf of a cold remote
read had that ``write`` at 25% of the daemon's CPU. A fetch that fails abandons its
reservation. Without a disk tier, without leases, or when the file cannot be made, the
fetch receives into a plain buffer and `put` writes it.

Temporary files. A new block file is unnamed until it is whole (``O_TMPFILE``, then
``linkat`` of ``/proc/self/fd/N`` and a rename over the block's name), so nobody can open
it before and a fetch killed midway (SIGKILL, power loss) leaves nothing: its space goes
with the process. Where the filesystem cannot do that, the file is
``<key>.tmp.<64 random bits>``, created ``O_EXCL|O_NOFOLLOW`` and write-leased at once;
at start-up such files that no process holds a lease or lock on (``/proc/locks``) and
that are older than `STALE_TEMPORARY` are removed, which is safe with other live mounts
sharing the directory (theirs are leased, or young).

Index and eviction. A small SQLite database (``<dir>/index.sqlite3``, WAL mode, shared by
every process using the directory) records each block's size and last-access time, and
the set of pinned keys. After a `put`, if the blocks' total size exceeds ``disk_limit``,
the least recently used unpinned blocks are deleted inside one write transaction, so two
processes never over- or double-evict. Access times are written when a process first
reads a block and then at most once a minute per block, not on every read. A process
that still has an evicted file open keeps reading it safely (POSIX unlink semantics).
`pin`/`unpin` persist in the index, so a block pinned by `fedmount stage --pin` survives
restarts and is never evicted by any process until unpinned. Blocks this process holds
(`hold`, see "Holds") are never evicted by it either.

Index repair. The index is checked (``PRAGMA quick_check``) when a process opens it; a
corrupt one is rebuilt from the block files on disk (every file a key, its size from the
key, its access time from the file), keeping the pins that can still be read, under a
lock file so that one process rebuilds it; the new file replaces the old one (whose WAL
is removed first, never to be replayed into it), and a process that finds the index
replaced reconnects. Updates made on the read path (access times, discarding a block)
wait at most `READ_PATH_WAIT` for another process's write and are best effort: a
failure is logged once and reads go on.

Why not `diskcache` for the block bytes: measured here with 64 MiB values, its ``set``
ran at 0.47 GB/s against 0.69 GB/s for write+rename of a plain file, a lookup with LRU
bookkeeping cost ~114 us (a SQLite write per access) against ~9 us for a 128 KiB
``pread``, and it has no pinning and no per-chunk integrity. diskcache is itself
"plain files + SQLite"; this module keeps that shape with the index the cache needs.

Memory tier. An LRU of verified 1 MiB chunks of fetched blocks keyed by ``(key, chunk
index)``: a block `put` from a plain buffer lands there as zero-copy views of it, bounded
by ``ram_limit`` bytes (with ``disk_limit=0`` this is the only tier). A block received
into its file is not kept there (views of a file's mapping live only under its lease,
and its write lease would keep every other process from opening the file): its readers
read it from the disk tier, each chunk checked once.

Holds. `hold` keeps a block from eviction from the last tier (the disk, or memory without
one) until `release`; admission.py holds the blocks being read and keeps the held bytes
within `capacity`.

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
alive after the block leaves the LRU, and after an eviction unlinks the file).
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

Leases. fedmount never writes a block file in place, but someone else may (a careless
``truncate``, a backup tool): pages of a mapping beyond the end of a file that shrank
raise SIGBUS in whatever touches them (the xxh3 check, a copy of a view), which kills the
daemon. So a block file is mapped only while this process holds a lease on it
(``F_SETLEASE``: ``F_RDLCK`` on a file opened to read, ``F_WRLCK`` on a fresh one):
another process that opens it to write or truncates it then waits (``O_NONBLOCK``
openers such as ``truncate(1)`` fail with EAGAIN) until this process lets the file go or
the kernel's lease-break-time (45 s) passes. A watcher task checks the open blocks'
leases every `LEASE_POLL` seconds (``F_GETLEASE``; the break notice itself is
`LEASE_SIGNAL`, ignored by default) and discards a block whose lease is breaking
(``cache_corrupt``, one warning); its mapping goes with the last view of it, and the
lease with the mapping. The same process opening a fresh block file it holds a write
lease on uses the live mapping instead (`_FRESH`). A file that cannot be leased (a
filesystem without leases, a file open for writing) is read with ``preadv`` into new
buffers and checked the same way, chunk by chunk: a file that shrank is a short read,
hence a miss, never a signal.

Degrading. If the directory cannot be created or written (read-only, no space,
permissions) or cannot be trusted (see "Who may share"), the cache logs exactly one
warning, with what to do about it, and continues memory-only.

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

import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import signal
import sqlite3
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
import xxhash

from fedmount.stats import Stats

log = logging.getLogger("fedmount.cache")
T = TypeVar("T")

CHUNK = 1 << 20
READ_AHEAD_CHUNKS = 2  # chunks a sequential read verifies per hop, beyond the ones asked for
SMALL_READ = 128 * 1024  # random reads up to this size are one non-blocking pread of their bytes
DIGEST = xxhash.xxh3_64_intdigest
MAGIC = b"FMBLK\x01\x00\x00"
OPEN_FILES = 64  # block files kept open per process, with the chunks verified
MAPPED_BLOCKS = 8  # of those, the ones kept mapped (their touched pages count in RSS)
TOUCH_INTERVAL = 60.0  # seconds between access-time updates of one block
MIN_DISK_CACHE = 64 << 20  # the smallest default disk bound: one full-size Keep block
LEASE_SIGNAL = signal.SIGURG  # sent when another process breaks a lease: ignored by default (we poll)
LEASE_POLL = 0.5  # seconds between checks for leases another process is breaking
STALE_TEMPORARY = 600.0  # seconds: an unleased temporary block file older than this is a dead fetch's
KEY_NAME = re.compile(r"[0-9a-f]{32}\+[0-9]+")
TEMPORARY_NAME = re.compile(r"[0-9a-f]{32}\+[0-9]+\.tmp\..+")
INDEX = "index.sqlite3"
INDEX_FILES = (INDEX, INDEX + "-wal", INDEX + "-shm")
CORRUPT_INDEX = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
INDEX_WAIT = 60.0  # seconds a write to the index waits for another process's
READ_PATH_WAIT = 0.1  # the same for the read path's best-effort updates (a reader waits for them)


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


class UntrustedDirectory(Exception):
    """Someone other than this user could change what the cache directory holds (see "Who may share")."""


def _writers(st: os.stat_result) -> str | None:
    """Who besides the owner may write to a file or directory with this status, or None."""
    if st.st_mode & stat.S_IWOTH:
        return "anyone"
    if st.st_mode & stat.S_IWGRP:
        return f"group {st.st_gid}"
    return None


def check_ownership(directory: str) -> None:
    """Raise `UntrustedDirectory` unless only this user (and root) can change the cache directory.

    The directory, its ``blocks/`` fan-out and its index must belong to this user and be
    writable by nobody else; every parent directory must belong to this user or to root and
    be writable by nobody else unless it is sticky (like ``/tmp``), or someone could swap the
    directory for one of theirs."""
    me = os.geteuid()
    real = os.path.realpath(directory)
    st = os.lstat(real)
    if st.st_uid != me:
        raise UntrustedDirectory(f"it belongs to uid {st.st_uid}, not to this user (uid {me})")
    if who := _writers(st):
        raise UntrustedDirectory(f"{who} can write to it (mode {stat.S_IMODE(st.st_mode):o})")
    parent = real
    while parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        pst = os.stat(parent)
        if pst.st_uid not in (0, me):
            raise UntrustedDirectory(f"its parent {parent} belongs to uid {pst.st_uid}, who can replace it")
        if (who := _writers(pst)) and not pst.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(pst.st_mode)
            raise UntrustedDirectory(f"{who} can replace it (its parent {parent} is mode {mode:o})")
    blocks = os.path.join(real, "blocks")
    inside = [os.path.join(real, name) for name in INDEX_FILES]
    if os.path.isdir(blocks):
        inside += [blocks, *(entry.path for entry in os.scandir(blocks))]
    for path in inside:
        try:
            est = os.lstat(path)
        except FileNotFoundError:
            continue
        rel = os.path.relpath(path, real)
        if est.st_uid != me:
            raise UntrustedDirectory(f"{rel} in it belongs to uid {est.st_uid}")
        if who := _writers(est):
            raise UntrustedDirectory(f"{who} can write to {rel} in it")
        if stat.S_ISLNK(est.st_mode):
            raise UntrustedDirectory(f"{rel} in it is a symbolic link")


def _tighten(directory: str) -> None:
    """Make the cache's directories 0700 and its index 0600 (all this user's: `check_ownership`)."""
    blocks = os.path.join(directory, "blocks")
    for path in [directory, blocks, *(e.path for e in os.scandir(blocks) if e.is_dir(follow_symlinks=False))]:
        os.chmod(path, 0o700)
    for name in INDEX_FILES:
        try:
            os.chmod(os.path.join(directory, name), 0o600)
        except FileNotFoundError:
            pass


def _lease(fd: int, kind: int) -> bool:
    """Take a read (F_RDLCK) or write (F_WRLCK) lease on an open file (see "Leases"); False if refused."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)
    except OSError:
        return False
    return True


def _new_file(directory: str, key: str, unnamed: bool) -> tuple[int, str | None]:
    """A new file for a block in `directory` (mode 0600), open read-write: unnamed (``O_TMPFILE``)
    if `unnamed`, else ``<key>.tmp.<random>``, created exclusively. The name, or None."""
    if unnamed:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), None
    name = os.path.join(directory, f"{key}.tmp.{secrets.token_hex(8)}")
    return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), name


def _publish(fd: int, name: str | None, path: str) -> None:
    """Move a new file (unnamed if `name` is None) to `path`, replacing what is there at once."""
    if name is None:
        name = f"{path}.tmp.{secrets.token_hex(8)}"
        _link_unnamed(fd, name)
    try:
        os.rename(name, path)
    except BaseException:
        os.unlink(name)
        raise


def _link_unnamed(fd: int, name: str) -> None:
    """Give an unnamed (O_TMPFILE) file a name: linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, the
    way that needs no privilege (a directory fd makes `os.link` call linkat, not link)."""
    directory = os.open(os.path.dirname(name), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", os.path.basename(name), dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _locked_inodes() -> set[tuple[int, int]]:
    """(device, inode) of every file that has a lock or lease on this host (``/proc/locks``)."""
    out: set[tuple[int, int]] = set()
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        for word in line.split():
            parts = word.split(":")
            if len(parts) == 3 and all(parts):
                try:
                    out.add((os.makedev(int(parts[0], 16), int(parts[1], 16)), int(parts[2])))
                except ValueError:
                    pass
                break
    return out


@dataclass
class Reservation:
    """A block's future cache file, mapped writable, for a fetch to receive the block into."""

    key: str
    tmp: str | None  # the temporary file's name; None for an unnamed file (O_TMPFILE)
    fd: int  # open until `BlockCache.put` publishes the file or `abandon` drops it; then -1
    buffer: memoryview  # writable, the block's size: what the fetch fills
    mapping: mmap.mmap  # block + trailer; lives as long as views of it do

    def abandon(self) -> None:
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
    leased: bool  # a lease keeps anyone from shrinking the file: it may be mapped ("Leases")
    mapping: memoryview | None = None  # read-only, the block's bytes; lives while views of it do
    verified: set[int] = field(default_factory=set)
    touched: float = 0.0
    transient: bool = False  # a fresh block's mapping, used for one read and never kept ("Leases")


# The mappings of blocks this process received and published, while views of them live: their
# write lease would block this process's own open() of their file (see "Leases").
_FRESH: weakref.WeakValueDictionary[str, mmap.mmap] = weakref.WeakValueDictionary()
_scratch = threading.local()  # per worker thread: one chunk's buffer for verifying a file read by pread


def _scratch_chunk() -> bytearray:
    buf = getattr(_scratch, "chunk", None)
    if buf is None:
        buf = _scratch.chunk = bytearray(CHUNK)
    return buf


class _DiskTier:
    """Block files plus the SQLite index; every method runs in a worker thread."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(os.path.join(directory, "blocks"), mode=0o700, exist_ok=True)
        check_ownership(directory)
        _tighten(directory)
        self.unnamed, self.leases = self._probe()
        self._db_lock = threading.Lock()
        self._index = os.path.join(directory, INDEX)
        self._db, self._index_inode = self._connect()
        self._index_trouble = False  # an update from the read path failed (logged once)
        self._open: OrderedDict[str, _OpenBlock] = OrderedDict()
        self._mapped: OrderedDict[str, _OpenBlock] = OrderedDict()  # the open blocks with a mapping
        self._open_lock = threading.Lock()
        self._remove_stale_temporaries()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, "blocks", key[:2], key)

    # the index -----------------------------------------------------------------------

    def _connect(self, rebuilt: bool = False) -> tuple[sqlite3.Connection, int]:
        """Open the index (made 0600 first: SQLite gives its -wal and -shm the same mode), rebuilding
        it from the block files if it is corrupt (see "Index repair")."""
        os.close(os.open(self._index, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        db = sqlite3.connect(self._index, timeout=INDEX_WAIT, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _create_tables(db)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
        except sqlite3.DatabaseError as exc:
            db.close()
            if rebuilt or isinstance(exc, sqlite3.OperationalError):
                raise
            self._rebuild_index(exc)
            return self._connect(rebuilt=True)
        return db, os.stat(self._index).st_ino

    def _rebuild_index(self, why: BaseException) -> None:
        """Replace a corrupt index with one listing the block files on disk, keeping what pins can be
        read from the old one. One process at a time (a lock file); if another one rebuilt it
        meanwhile, there is nothing left to do."""
        with open(os.path.join(self.directory, "index.lock"), "a", opener=_private) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _index_is_sound(self._index):
                return
            pins = _readable_pins(self._index)
            fresh = f"{self._index}.rebuild.{secrets.token_hex(4)}"
            db = sqlite3.connect(fresh, isolation_level=None)
            try:
                os.chmod(fresh, 0o600)
                _create_tables(db)
                rows = list(self._block_files())
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", rows)
                db.executemany("INSERT OR IGNORE INTO pins (key) VALUES (?)", [(k,) for k in pins])
                db.execute("COMMIT")
            finally:
                db.close()
            for name in INDEX_FILES[1:]:  # the old WAL must never be replayed into the new file
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
            os.rename(fresh, self._index)
        log.warning(
            "block cache: the index %s was corrupt (%s); rebuilt it from the %d block files on disk, "
            "%d pins kept",
            self._index, why, len(rows), len(pins),
        )  # fmt: skip

    def _block_files(self) -> Iterable[tuple[str, int, float]]:
        """(key, size, access time) of every block file on disk."""
        for fan in os.scandir(os.path.join(self.directory, "blocks")):
            if fan.is_dir(follow_symlinks=False):
                for entry in os.scandir(fan.path):
                    if KEY_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                        yield entry.name, key_size(entry.name), entry.stat(follow_symlinks=False).st_atime

    def _db_call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the index; once more after reconnecting if another process replaced the index
        file, or after rebuilding it if it is corrupt (see "Index repair")."""
        with self._db_lock:
            try:
                return work(self._db)
            except sqlite3.DatabaseError as exc:
                replaced = self._index_replaced()
                if not replaced and (
                    isinstance(exc, sqlite3.OperationalError)
                    or getattr(exc, "sqlite_errorcode", None) not in CORRUPT_INDEX
                ):
                    raise
                self._db.close()
                if not replaced:
                    self._rebuild_index(exc)
                self._db, self._index_inode = self._connect()
                return work(self._db)

    def _index_replaced(self) -> bool:
        try:
            return os.stat(self._index).st_ino != self._index_inode
        except FileNotFoundError:
            return True

    def _sql(self, query: str, args: Iterable[object] = ()) -> list[tuple]:
        params = tuple(args)
        return self._db_call(lambda db: db.execute(query, params).fetchall())

    def _best_effort(self, query: str, args: tuple[object, ...]) -> None:
        """Update the index from the read path (an access time, a discarded block), waiting at most
        `READ_PATH_WAIT` for another process's write: a failure is logged once and reads go on;
        the index may then be behind the files until it works again."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(f"PRAGMA busy_timeout = {int(READ_PATH_WAIT * 1000)}")
            try:
                db.execute(query, args)
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(INDEX_WAIT * 1000)}")

        try:
            self._db_call(work)
        except sqlite3.Error as exc:
            if not self._index_trouble:
                log.warning("block cache: cannot update %s (%s); reads go on", self._index, exc)
            self._index_trouble = True
        else:
            self._index_trouble = False

    # files ---------------------------------------------------------------------------

    def _probe(self) -> tuple[bool, bool]:
        """Whether this filesystem makes unnamed files that can be linked, and grants leases."""
        blocks = os.path.join(self.directory, "blocks")
        unnamed = True
        try:
            fd, name = _new_file(blocks, ".probe", unnamed=True)
            probe = f"{blocks}/.probe.{secrets.token_hex(4)}"
            try:
                _link_unnamed(fd, probe)
                os.unlink(probe)
            finally:
                os.close(fd)
        except OSError:
            unnamed = False
        fd, name = _new_file(blocks, ".probe", unnamed=False)
        try:
            leases = _lease(fd, fcntl.F_WRLCK)
        finally:
            os.close(fd)
            os.unlink(name)  # type: ignore[arg-type]
        if not leases:
            log.info("block cache: %s grants no file leases; block files are read with pread", self.directory)
        return unnamed, leases

    def _remove_stale_temporaries(self) -> int:
        """Delete temporary block files left by fetches that died (SIGKILL, power loss): those no
        process holds a lease or lock on and that are older than `STALE_TEMPORARY` (a live fetch
        of any fedmount sharing the directory holds a lease on its file). Returns bytes freed."""
        locked = _locked_inodes()
        now = time.time()
        freed = 0
        for fan in os.scandir(os.path.join(self.directory, "blocks")):
            if not fan.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fan.path):
                if not TEMPORARY_NAME.fullmatch(entry.name):
                    continue
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) in locked or now - st.st_mtime < STALE_TEMPORARY:
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                freed += st.st_blocks * 512
        if freed:
            log.info("block cache: removed %d MiB of temporary files left by fetches that died", freed >> 20)
        return freed

    def contains(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store a block from a plain buffer: a new file, written and then moved into place."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, name = _new_file(os.path.dirname(path), key, self.unnamed)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.write(trailer(data))
            _publish(fd, name, path)
        except BaseException:
            if name is not None and os.path.exists(name):
                os.unlink(name)
            raise
        finally:
            os.close(fd)
        self._sql("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (key, len(data), time.time()))

    def reserve(self, key: str) -> Reservation:
        """A new file for the block, its space allocated, mapped writable (see "Filling" and "Leases")."""
        if not self.leases:
            raise OSError(errno.ENOLCK, "the filesystem grants no leases")
        path = self.path(key)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        size = key_size(key)
        length = size + trailer_length(size)
        fd, name = _new_file(os.path.dirname(path), key, self.unnamed)
        try:
            if name is not None and not _lease(fd, fcntl.F_WRLCK):
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
            if reservation.tmp is None and not _lease(reservation.fd, fcntl.F_WRLCK):
                self.write(reservation.key, reservation.buffer)  # a copy whose file nobody maps
                reservation.abandon()
                return
            _publish(reservation.fd, reservation.tmp, self.path(reservation.key))
        except BaseException:
            reservation.abandon()
            raise
        reservation.close()  # the mapping keeps the file and its lease as long as views of it live
        _FRESH[reservation.key] = reservation.mapping
        self._sql("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (reservation.key, size, time.time()))

    def _opened(self, key: str) -> _OpenBlock | None:
        with self._open_lock:
            block = self._open.get(key)
            if block is not None:
                self._open.move_to_end(key)
                return block
        size = key_size(key)
        fresh = _FRESH.get(key)
        if fresh is not None:  # our own write lease on it would block open() (see "Leases")
            n = chunk_count(size)
            view = memoryview(fresh)[:size]
            return _OpenBlock(None, -1, -1, size, (), True, view, set(range(n)), time.time(), transient=True)
        path = self.path(key)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block open() forever
                raise CorruptBlock("not a regular file")
            f = open(path, "rb", buffering=0, opener=_no_follow)  # kept open in the LRU below
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or _writers(st):
                raise CorruptBlock(f"the file belongs to uid {st.st_uid} (mode {stat.S_IMODE(st.st_mode):o})")
            leased = self.leases and _lease(f.fileno(), fcntl.F_RDLCK)
            st = os.fstat(f.fileno())
            tail_len = trailer_length(size)
            if st.st_size != size + tail_len:
                raise CorruptBlock(f"file is {st.st_size} bytes, expected {size + tail_len}")
            tail = os.pread(f.fileno(), tail_len, size)
            n = chunk_count(size)
            if len(tail) != tail_len or tail[-len(MAGIC) :] != MAGIC or _trailer_size(tail, n) != size:
                raise CorruptBlock("bad trailer")
        except BaseException:
            f.close()
            raise
        block = _OpenBlock(f, f.fileno(), st.st_ino, size, struct.unpack_from(f"<{n}Q", tail), leased)
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
        on disk.

        Runs in a worker thread (it reads the disk). Raises `CorruptBlock` on a bad chunk, or when
        the file of an unleased block shrank."""
        block = self._opened(key)
        if block is None:
            return None
        last = min(last, chunk_count(block.size) - 1)
        todo = [i for i in range(first, last + 1) if i not in block.verified]
        data = self.mapped(key, block) if block.leased and todo else None
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
        now = time.time()
        if now - block.touched > TOUCH_INTERVAL:
            block.touched = now
            self._best_effort(
                "INSERT INTO blocks VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET atime=?",
                (key, block.size, now, now),
            )
        return block

    def serve(self, key: str, block: _OpenBlock, offset: int, end: int) -> memoryview | bytearray:
        """Bytes [offset, end) of a verified block: a view of its mapping if it is leased, else read
        (in a worker thread: this may wait for the disk). Raises `CorruptBlock` if the file shrank."""
        if block.leased:
            return self.mapped(key, block)[offset:end]
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
        verified = block.verified
        if not all(i in verified for i in range(first, last + 1)):
            return None
        return block

    def verified(self, key: str) -> set[int] | frozenset[int]:
        """The chunks of the block this process has verified (empty if it is not open)."""
        with self._open_lock:
            block = self._open.get(key)
        return block.verified if block is not None else frozenset()

    def ready(self, key: str, offset: int, end: int, *, small: bool) -> memoryview | bytearray | None:
        """Bytes [offset, end) of an open block whose chunks this process has verified (and whose
        access time is fresh), without waiting for anything; None when that cannot be done.

        A view of the mapping (no system call, no copy) for a leased block; a ``preadv
        (RWF_NOWAIT)`` copy of just the bytes for a `small` read (copying whole 1 MiB chunks
        to serve 4 KiB costs more than the read itself) or an unleased block (the kernel
        answers EAGAIN rather than wait for a disk)."""
        block = self._ready(key, offset // CHUNK, (end - 1) // CHUNK)
        if block is None:
            return None
        if block.leased and not small:
            return self.mapped(key, block)[offset:end]
        buf = bytearray(end - offset)
        try:
            got = os.preadv(block.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:  # not in the page cache (EAGAIN), or RWF_NOWAIT unsupported
            return None
        return buf if got == len(buf) else None  # short: not all in the page cache, or the file shrank

    def breaking(self) -> list[str]:
        """Open blocks whose read lease another process is breaking: it opened the file to write or
        truncate it (see "Leases")."""
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
        self._best_effort("DELETE FROM blocks WHERE key = ?", (key,))

    def evict(self, limit: int, keep: set[str] | frozenset[str]) -> tuple[int, int]:
        """Delete least recently used blocks, neither pinned nor in `keep`, until the total is
        within `limit`. Returns (blocks evicted, bytes on disk after eviction)."""

        def work(db: sqlite3.Connection) -> tuple[list[str], int]:
            evicted: list[str] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                total = db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]
                if total > limit:
                    rows = db.execute(
                        "SELECT key, size FROM blocks WHERE key NOT IN (SELECT key FROM pins) ORDER BY atime"
                    )
                    for key, size in rows.fetchall():
                        if total <= limit:
                            break
                        if key not in keep:
                            evicted.append(key)
                            total -= size
                    db.executemany("DELETE FROM blocks WHERE key = ?", [(k,) for k in evicted])
                    for key in evicted:
                        try:
                            os.unlink(self.path(key))
                        except FileNotFoundError:
                            pass
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return evicted, total

        evicted, total = self._db_call(work)
        with self._open_lock:
            for key in evicted:
                self._open.pop(key, None)
                self._mapped.pop(key, None)
        return len(evicted), total

    def pin(self, keys: Iterable[str]) -> None:
        rows = [(k,) for k in keys]
        self._db_call(lambda db: db.executemany("INSERT OR IGNORE INTO pins (key) VALUES (?)", rows))

    def unpin(self, keys: Iterable[str]) -> None:
        rows = [(k,) for k in keys]
        self._db_call(lambda db: db.executemany("DELETE FROM pins WHERE key = ?", rows))

    def pinned(self) -> set[str]:
        return {k for (k,) in self._sql("SELECT key FROM pins")}


def _trailer_size(tail: bytes, chunks: int) -> int:
    return struct.unpack_from("<Q", tail, 8 * chunks)[0]


def _create_tables(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS blocks (key TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS blocks_atime ON blocks(atime)")
    db.execute("CREATE TABLE IF NOT EXISTS pins (key TEXT PRIMARY KEY)")


def _index_is_sound(index: str) -> bool:
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=60)
        try:
            return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _readable_pins(index: str) -> list[str]:
    """What can still be read of a corrupt index's pins (nothing if that fails)."""
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
        try:
            return [k for (k,) in db.execute("SELECT key FROM pins") if KEY_NAME.fullmatch(str(k))]
        finally:
            db.close()
    except sqlite3.Error:
        return []


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


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


class BlockCache:
    def __init__(self, directory: str | None, disk_limit: int, ram_limit: int, stats: Stats | None = None):
        self._stats = stats if stats is not None else Stats()
        self._disk_limit = disk_limit
        self._ram_limit = ram_limit
        self._ram: OrderedDict[tuple[str, int], bytes | memoryview] = OrderedDict()
        self._ram_bytes = 0
        self._loading: dict[tuple[str, int], trio.Event] = {}  # chunks of block files being verified
        self._held: set[str] = set()  # blocks being read: never evicted (see "Holds")
        self._disk: _DiskTier | None = None
        self._degraded = False
        self._watching: trio.lowlevel.TrioToken | None = None  # the run whose lease watcher is started
        if disk_limit > 0:
            directory = directory if directory is not None else default_cache_dir()
            try:
                self._disk = _DiskTier(directory)
            except (OSError, sqlite3.Error, UntrustedDirectory) as exc:
                self._degrade(directory, exc)

    @property
    def directory(self) -> str | None:
        """The disk tier's directory, or None when running memory-only."""
        return self._disk.directory if self._disk is not None else None

    @property
    def capacity(self) -> int:
        """Bytes the cache holds: its disk bound with a disk tier, else its memory bound."""
        return self._disk_limit if self._disk is not None else self._ram_limit

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

    # memory tier -------------------------------------------------------------------

    def _ram_put(self, key: str, index: int, chunk: bytes | memoryview) -> None:
        slot = (key, index)
        old = self._ram.pop(slot, None)
        if old is not None:
            self._ram_bytes -= len(old)
        self._ram[slot] = chunk
        self._ram_bytes += len(chunk)
        if self._ram_bytes > self._ram_limit:
            # Without a disk tier, memory is the last tier: blocks being read stay (see "Holds").
            keep = self._held if self._disk is None else ()
            for victim in [s for s in self._ram if s[0] not in keep]:
                if self._ram_bytes <= self._ram_limit:
                    break
                self._ram_bytes -= len(self._ram.pop(victim))
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
            small = not readahead and end - offset <= SMALL_READ  # see "Reading block files"
            out = disk.ready(key, offset, end, small=small)
            if out is not None and not isinstance(out, memoryview):
                tier = "disk"
            if out is None:
                hi = last + (READ_AHEAD_CHUNKS if readahead else 0)
                out = await self._verify(key, first, hi, serve=(offset, end))
                if out is None:
                    return self._miss(length)
                tier = "disk"
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

    def _watch(self, disk: _DiskTier) -> None:
        """Start the task that withdraws blocks whose lease another process breaks (once per run)."""
        self._watching = trio.lowlevel.current_trio_token()
        if disk.leases:
            trio.lowlevel.spawn_system_task(self._watch_leases, disk, name="block cache leases")

    async def _watch_leases(self, disk: _DiskTier) -> None:
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
        disk = self._disk
        if disk is None and reservation is not None:
            reservation.abandon()  # now nobody can open its file: its mapping is safe to keep
            reservation = None
        if reservation is None:  # a block file's mapping is kept only under its lease ("Leases")
            for index in range(chunk_count(len(view))):
                self._ram_put(key, index, view[index * CHUNK : (index + 1) * CHUNK])
        if disk is None:
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
        return disk.evict(self._disk_limit, keep=self._held | {key})

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
