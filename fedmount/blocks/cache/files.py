"""File primitives of the disk tier: unnamed new files, publishing them, leases, openers.

Temporary files. A new block file is unnamed until it is whole (``O_TMPFILE``, then
``linkat`` of ``/proc/self/fd/N`` and a rename over the block's name), so nobody can open
it before and a fetch killed midway (SIGKILL, power loss) leaves nothing: its space goes
with the process. Where the filesystem cannot do that, the file is
``<key>.tmp.<64 random bits>``, created ``O_EXCL|O_NOFOLLOW`` and write-leased at once;
at start-up such files that no process holds a lease or lock on (``/proc/locks``) and
that are older than ``STALE_TEMPORARY`` are removed (`remove_dead_temporaries`), which is
safe with other live mounts sharing the directory (theirs are leased, or young).

Leases (``F_SETLEASE``): while this process holds one on a block file, another process
that opens it to write or truncates it waits until this process lets the file go (or the
kernel's lease-break-time passes); disk.py maps a file only under a lease, so a file
shrinking under a mapping (SIGBUS) cannot happen. The break notice is `LEASE_SIGNAL`,
ignored by default: the cache polls ``F_GETLEASE`` instead.

Residency (``cachestat``, Linux 6.5): `resident` tells whether every page of a range of a
file is in the page cache, so that reading it through a mapping faults without reading the
disk: the trio thread may then serve a range of a mapped block file, or verify a chunk,
itself. One system call that never waits, made without releasing the GIL (about 0.5 µs).
Where the kernel, the architecture or a seccomp filter does not offer it, the answer is
None ("cannot tell"), and the caller does without it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import secrets
import signal
import time
from collections.abc import Callable

STALE_TEMPORARY = 600.0  # seconds: an unleased temporary block file older than this is a dead fetch's
LEASE_SIGNAL = signal.SIGURG  # sent when another process breaks a lease: ignored by default (we poll)
_CACHESTAT = 451 if platform.machine() in ("x86_64", "aarch64") else None  # the same number on both


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                      "nr_recently_evicted")]  # fmt: skip


def _cachestat() -> ctypes._CFuncPtr | None:
    if _CACHESTAT is None:
        return None
    call = ctypes.PyDLL(None, use_errno=True).syscall  # keeps the GIL: the call never waits
    call.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    call.restype = ctypes.c_long
    return call


_syscall = _cachestat()


def resident(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of bytes [offset, offset+length) of the open file is in the page cache;
    None when the kernel cannot tell (see "Residency")."""
    global _syscall
    if _syscall is None:
        return None
    start = offset - offset % mmap.PAGESIZE
    span, stat = _Range(start, offset + length - start), _CacheStat()
    if _syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # before 6.5, or a seccomp filter
            _syscall = None  # never ask again
        return None
    return stat.nr_cache >= (span.len + mmap.PAGESIZE - 1) // mmap.PAGESIZE


def lease(fd: int, kind: int) -> bool:
    """Take a read (F_RDLCK) or write (F_WRLCK) lease on an open file; False if refused."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)
    except OSError:
        return False
    return True


def new_file(directory: str, key: str, unnamed: bool) -> tuple[int, str | None]:
    """A new file for a block in `directory` (mode 0600), open read-write: unnamed (``O_TMPFILE``)
    if `unnamed`, else ``<key>.tmp.<random>``, created exclusively. The name, or None."""
    if unnamed:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), None
    name = os.path.join(directory, f"{key}.tmp.{secrets.token_hex(8)}")
    return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), name


def publish(fd: int, name: str | None, path: str) -> None:
    """Move a new file (unnamed if `name` is None) to `path`, replacing what is there at once."""
    if name is None:
        name = f"{path}.tmp.{secrets.token_hex(8)}"
        link_unnamed(fd, name)
    try:
        os.rename(name, path)
    except BaseException:
        os.unlink(name)
        raise


def link_unnamed(fd: int, name: str) -> None:
    """Give an unnamed (O_TMPFILE) file a name: linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, the
    way that needs no privilege (a directory fd makes `os.link` call linkat, not link)."""
    directory = os.open(os.path.dirname(name), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", os.path.basename(name), dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def locked_inodes() -> set[tuple[int, int]]:
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


def remove_dead_temporaries(blocks_dir: str, is_temporary: Callable[[str], object]) -> int:
    """Delete the temporary block files (names `is_temporary` accepts) in the fan directories of
    `blocks_dir` that no process holds a lease or lock on and that are older than
    `STALE_TEMPORARY`: a live fetch of any fedmount sharing the directory holds a lease on its
    file. Returns the bytes freed."""
    locked = locked_inodes()
    now = time.time()
    freed = 0
    for fan in os.scandir(blocks_dir):
        if not fan.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(fan.path):
            if not is_temporary(entry.name):
                continue
            st = entry.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino) in locked or now - st.st_mtime < STALE_TEMPORARY:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            freed += st.st_blocks * 512
    return freed


def private(path: str, flags: int) -> int:
    """An `open` opener: mode 0600 if it creates the file, never following a symbolic link."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
