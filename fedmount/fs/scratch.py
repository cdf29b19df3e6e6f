"""``--mount-tmp NAME``: a writable scratch directory, the one place a mount takes writes.

crunch-run gives a container's writable output collection a ``tmpN`` directory of the
mount (``--mount-tmp tmpN``), bind-mounts it into the container, and after the container
exits reads ``tmpN/.arvados#collection``, whose ``manifest_text`` it saves as the output:
the blocks must already be in Keep with valid signatures. This module is that directory,
as a plain async model (`fs/fuse.py` routes the write operations here; unit tests drive it
without a mount):

Files and directories
    A `ScratchStore` is one ``tmpN``: directories are in memory (`ScratchDir`, a dict of
    names), each file's bytes in a file of its own on local disk (`ScratchFile`), created
    in the backing directory and unlinked at once, so only its descriptor names it: the
    bytes go when the daemon goes, even killed (crunch-run kills a mount 9 s after asking
    it to unmount), and nothing is left to clean up. That is one descriptor per file (the
    daemon raises its open-file limit to the hard limit at start; past it, EMFILE). Writes
    and reads are ``pwrite`` and ``pread`` on it, at the speed of the local disk's page
    cache. Names are those a collection can hold (not ``.``, ``..`` nor
    ``.arvados#collection`` at the root); files, directories, renames (replacing a file or
    an empty directory, ``RENAME_NOREPLACE``), truncation, ``chmod`` (of the execute bits:
    anyone may write, see `ScratchAttr`) and ``utime`` work; symlinks, hard links and
    special files do not (EPERM), as a collection cannot hold them. A file unlinked while
    open stays readable and writable through its handles and frees its space at the last
    close.

Space
    Every store of a mount shares one `Quota`: the sum of the file sizes may not pass its
    limit; a write or truncation past it fails with ENOSPC and changes nothing. The local
    disk filling first gives ENOSPC too.

Inode numbers
    Each store takes ranges of numbers from the mount's `InodeTable` (`RangeOwner`), 4096 at
    a time, and maps them to its live nodes; numbers are never reused.

``.arvados#collection``
    Hidden at the root of each store. Opening it uploads what the store holds
    (`fedmount.blocks.upload.Uploader`: blocks packed to 64 MiB, PUT to the home cluster
    with the copies and storage classes asked for; blocks stored by an earlier read are
    not sent again) and answers arv-mount's record of a scratch collection: ``uuid``
    null, the signed ``manifest_text``, its ``portable_data_hash`` and
    ``storage_classes_desired``. If the upload fails, the open fails with EIO and one
    log line ("Keep write error: ..."); the files stay, and the next open tries again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from fedmount.arvados.errors import KeepWriteError
from fedmount.arvados.manifest import portable_data_hash
from fedmount.blocks.upload import SourceDir, SourceFile
from fedmount.stats import Stats

from .collection import COLLECTION_RECORD_NAME
from .errors import FsError
from .inodes import RangeOwner
from .nodes import Attr, BytesHandle, DirNode, Handle, Node

log = logging.getLogger("fedmount.scratch")

TIMEOUT = 1.0  # kernel cache of scratch entries and attributes (every change goes through the kernel)
NUMBERS_PER_RANGE = 4096
RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2

Upload = Callable[[SourceDir], Awaitable[str]]  # -> signed manifest text
Allocate = Callable[[int, RangeOwner[Node]], int]


@dataclass(frozen=True, slots=True)
class ScratchAttr(Attr):
    """Attributes of a scratch node: as arv-mount shows a writable collection's, every
    directory 0777 and every file 0666, plus the execute bits a ``chmod`` gave it. Every node
    belongs to the mount's owner, and containers write as whatever user they run as."""

    perm: int = 0o644

    @property
    def mode(self) -> int:
        if self.is_dir:
            return stat.S_IFDIR | 0o777
        return stat.S_IFREG | 0o666 | (self.perm & 0o111)


class Quota:
    """Bytes the scratch files of a mount may hold together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def resize(self, old: int, new: int) -> None:
        """Account a file going from `old` to `new` bytes; ENOSPC (and nothing changed) past the limit."""
        if new > old and self.used + new - old > self.limit:
            raise FsError(errno.ENOSPC, f"scratch space full ({self.limit} bytes)")
        self.used += new - old


def default_quota(directory: str) -> int:
    """The limit when none is given: 95% of what the backing directory's filesystem has free."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize * 95 // 100


def _check_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FsError(errno.EINVAL, f"{name!r} cannot be a name in a collection")
    if len(os.fsencode(name)) > 255:
        raise FsError(errno.ENAMETOOLONG)


class ScratchNode(Node):
    store: ScratchStore
    perm: int
    mtime: float

    def set_times(self, mtime: float | None) -> None:
        self.mtime = self.store.wall() if mtime is None else mtime


class ScratchFile(ScratchNode):
    def __init__(self, store: ScratchStore, ino: int, perm: int):
        self.store = store
        self.ino = ino
        self.perm = perm & 0o7777
        self.mtime = store.wall()
        self.size = 0
        self.linked = True
        self.handles = 0
        try:
            fd, path = tempfile.mkstemp(prefix="fedmount-scratch-", dir=store.backing_dir)
        except OSError as e:  # EMFILE (one descriptor per file), ENOSPC, ...
            log.warning("cannot make a scratch file in %s: %s", store.backing_dir, e.strerror)
            raise FsError(e.errno or errno.EIO, f"scratch file: {e.strerror}") from None
        os.unlink(path)  # only the descriptor names it: gone with the daemon, however it ends
        self.fd = fd

    def attr(self) -> Attr:
        return ScratchAttr(self.ino, False, self.size, self.mtime, TIMEOUT, TIMEOUT, perm=self.perm)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        end = max(self.size, offset + len(data))
        self.store.quota.resize(self.size, end)
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as e:
            self.store.quota.resize(end, self.size)
            raise FsError(e.errno or errno.EIO, f"scratch write: {e.strerror}") from None
        self.store.quota.resize(end, max(self.size, offset + written))
        self.size = max(self.size, offset + written)
        self.mtime = self.store.wall()
        return written

    def truncate(self, size: int) -> None:
        self.store.quota.resize(self.size, size)
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            self.store.quota.resize(size, self.size)
            raise FsError(e.errno or errno.EIO, f"scratch truncate: {e.strerror}") from None
        self.size = size
        self.mtime = self.store.wall()

    def unlinked(self) -> None:
        self.linked = False
        self._maybe_free()

    def closed(self) -> None:
        self.handles -= 1
        self._maybe_free()

    def _maybe_free(self) -> None:
        if not self.linked and self.handles == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.store.quota.resize(self.size, 0)
            self.store.forget(self)


class ScratchHandle(Handle):
    """An open scratch file; writable unless opened read-only."""

    def __init__(self, file: ScratchFile, writable: bool):
        self.file = file
        self.writable = writable
        file.handles += 1

    async def read(self, offset: int, size: int) -> bytes:
        return self.file.read(offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise FsError(errno.EBADF)
        return self.file.write(offset, data)

    def close(self) -> None:
        self.file.closed()


class ScratchDir(ScratchNode, DirNode):
    def __init__(self, store: ScratchStore, ino: int, perm: int, parent: ScratchDir | None):
        self.store = store
        self.ino = ino
        self.perm = perm & 0o7777
        self.mtime = store.wall()
        self.parent = parent
        self.children: dict[str, ScratchNode] = {}

    def attr(self) -> Attr:
        return ScratchAttr(self.ino, True, 0, self.mtime, TIMEOUT, TIMEOUT, perm=self.perm)

    async def lookup(self, name: str) -> Node:
        node = self.children.get(name)
        if node is not None:
            return node
        if self is self.store.root and name == COLLECTION_RECORD_NAME:
            return self.store.record_file
        raise FsError(errno.ENOENT)

    async def entries(self) -> list[tuple[str, Node]]:
        return list(self.children.items())

    def _new_name(self, name: str) -> None:
        _check_name(name)
        if self is self.store.root and name == COLLECTION_RECORD_NAME:
            raise FsError(errno.EEXIST)
        if name in self.children:
            raise FsError(errno.EEXIST)

    def _changed(self) -> None:
        self.mtime = self.store.wall()

    def create(self, name: str, mode: int, writable: bool = True) -> tuple[ScratchFile, ScratchHandle]:
        self._new_name(name)
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise FsError(errno.EPERM, "a collection holds only regular files and directories")
        file = ScratchFile(self.store, self.store.number(), mode)
        self.store.adopt(file)
        self.children[name] = file
        self._changed()
        return file, ScratchHandle(file, writable)

    def mkdir(self, name: str, mode: int) -> ScratchDir:
        self._new_name(name)
        d = ScratchDir(self.store, self.store.number(), mode, self)
        self.store.adopt(d)
        self.children[name] = d
        self._changed()
        return d

    def _child(self, name: str) -> ScratchNode:
        node = self.children.get(name)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def unlink(self, name: str) -> None:
        node = self._child(name)
        if isinstance(node, ScratchDir):
            raise FsError(errno.EISDIR)
        del self.children[name]
        self._changed()
        assert isinstance(node, ScratchFile)
        node.unlinked()

    def rmdir(self, name: str) -> None:
        node = self._child(name)
        if not isinstance(node, ScratchDir):
            raise FsError(errno.ENOTDIR)
        if node.children:
            raise FsError(errno.ENOTEMPTY)
        del self.children[name]
        self._changed()
        self.store.forget(node)

    def rename(self, name: str, target: ScratchDir, new_name: str, flags: int = 0) -> None:
        if target.store is not self.store:
            raise FsError(errno.EXDEV)
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        node = self._child(name)
        _check_name(new_name)
        if target is self.store.root and new_name == COLLECTION_RECORD_NAME:
            raise FsError(errno.EEXIST)
        if isinstance(node, ScratchDir):
            ancestor: ScratchDir | None = target
            while ancestor is not None:  # no directory into itself or its own subtree
                if ancestor is node:
                    raise FsError(errno.EINVAL)
                ancestor = ancestor.parent
        old = target.children.get(new_name)
        if old is node:
            return
        if old is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if isinstance(old, ScratchDir):
                if not isinstance(node, ScratchDir):
                    raise FsError(errno.EISDIR)
                if old.children:
                    raise FsError(errno.ENOTEMPTY)
            elif isinstance(node, ScratchDir):
                raise FsError(errno.ENOTDIR)
        del self.children[name]
        target.children[new_name] = node
        if isinstance(node, ScratchDir):
            node.parent = target
        if isinstance(old, ScratchFile):
            old.unlinked()
        elif isinstance(old, ScratchDir):
            self.store.forget(old)
        self._changed()
        target._changed()


class RecordFile(Node):
    """``.arvados#collection`` of a store: opening it uploads the store (module docstring)."""

    def __init__(self, store: ScratchStore, ino: int):
        self.store = store
        self.ino = ino
        self.last_size = 0

    def attr(self) -> Attr:
        return Attr(self.ino, False, self.last_size, self.store.root.mtime, 0.0, 0.0)

    async def open(self) -> Handle:
        data = await self.store.collection_record()
        self.last_size = len(data)
        return BytesHandle(data, keep_cache=False, direct_io=True)


class ScratchStore:
    """One ``--mount-tmp`` directory: its nodes and its inode numbers (`RangeOwner`)."""

    def __init__(self, name: str, *, backing_dir: str, quota: Quota, allocate: Allocate,
                 upload: Upload, storage_classes: Sequence[str] = (), stats: Stats | None = None,
                 wall: Callable[[], float] = time.time):
        self.name = name
        self.backing_dir = backing_dir
        self.quota = quota
        self.wall = wall
        self.storage_classes = [c for c in storage_classes if c]
        self.stats = stats if stats is not None else Stats()
        self._upload = upload
        self._allocate = allocate
        self._nodes: dict[int, Node] = {}
        self._next = self._end = 0
        self._uploading = trio.Lock()
        self.root = ScratchDir(self, self.number(), 0o755, None)
        self.adopt(self.root)
        self.record_file = RecordFile(self, self.number())
        self.adopt(self.record_file)

    def number(self) -> int:
        if self._next == self._end:
            self._next = self._allocate(NUMBERS_PER_RANGE, self)
            self._end = self._next + NUMBERS_PER_RANGE
        self._next += 1
        return self._next - 1

    def adopt(self, node: Node) -> None:
        self._nodes[node.ino] = node

    def forget(self, node: Node) -> None:
        self._nodes.pop(node.ino, None)

    def node_at(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def source(self) -> SourceDir:
        """What the store holds now, as the uploader takes it."""

        def walk(d: ScratchDir) -> SourceDir:
            out = SourceDir()
            for name, node in d.children.items():
                if isinstance(node, ScratchDir):
                    out.dirs[name] = walk(node)
                else:
                    assert isinstance(node, ScratchFile)
                    out.files.append(SourceFile(name, node.size, node.read))
            return out

        return walk(self.root)

    async def collection_record(self) -> bytes:
        """Upload what the store holds; arv-mount's record of it, as JSON. FsError EIO if not."""
        async with self._uploading:  # two readers at once: the second reuses the first's blocks
            started = time.monotonic()
            source = self.source()
            try:
                manifest = await self._upload(source)
            except KeepWriteError as e:
                self.stats.add("scratch_upload_errors")
                log.error("%s: %s", self.name, e)
                raise FsError(errno.EIO, str(e)) from None
            except OSError as e:
                self.stats.add("scratch_upload_errors")
                log.error("Keep write error: %s: cannot read a file to upload: %s", self.name, e)
                raise FsError(errno.EIO, str(e)) from None
            pdh = portable_data_hash(manifest)
            log.info("%s: %d bytes saved as %s in %.1fs", self.name, source.size(), pdh,
                     time.monotonic() - started)
        record = {"uuid": None, "manifest_text": manifest, "portable_data_hash": pdh,
                  "storage_classes_desired": self.storage_classes}
        return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


async def open_scratch(node: Node, flags: int) -> Handle:
    """The handle of a scratch file opened with `flags` (O_TRUNC truncates), or the record's."""
    if isinstance(node, RecordFile):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EACCES)
        return await node.open()
    if isinstance(node, ScratchDir):
        raise FsError(errno.EISDIR)
    assert isinstance(node, ScratchFile)
    writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
    if flags & os.O_TRUNC and writable:
        node.truncate(0)
    return ScratchHandle(node, writable)


def is_scratch(node: Node) -> bool:
    return isinstance(node, (ScratchNode, RecordFile))
