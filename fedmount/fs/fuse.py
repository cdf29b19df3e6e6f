"""The thin pyfuse3 adapter over `Tree`: the only module that imports pyfuse3.

Each handler converts arguments (names arrive as bytes and are decoded as UTF-8 with
surrogate escapes, so any byte string round-trips), calls the model, and converts the
answer into pyfuse3's types. A read's answer may be a read-only view of the block cache
(a mapped block file): it is returned to pyfuse3 untouched, which copies it into the
reply. Every handler goes through `_guard`, which

- counts the operation and its time (``fuse_ops`` and ``fuse_seconds``, label ``op``);
- turns `FsError` into `pyfuse3.FUSEError` with its errno;
- turns any other exception into EIO, logging one line at error level and the traceback
  at debug level. Nothing escapes into pyfuse3, whose main loop would die of it.

Extended attributes live in the ``user.`` namespace only; a ``getxattr`` of any other name
(``security.selinux``, ``system.posix_acl_access``: ``ls -l`` asks both of every file)
answers EOPNOTSUPP, "not supported on this filesystem", rather than ENODATA, "supported,
absent". coreutils' ``ls`` remembers the former per device and stops asking, but asks again
for every file after the latter, so ``ls -l`` of a directory costs two round trips instead
of two per entry. (The kernel would remember an ENOSYS for the whole mount, but that would
hide ``user.arvados.*`` too.)

A listing leaves out the entries whose name the kernel cannot take, since they could
never be opened either: a name holding a NUL byte (the kernel would cut it there, so
``a\\000b`` would list as a second ``a``), longer than ``NAME_MAX`` (255 bytes, what
statfs promises and above which lookup answers ENAMETOOLONG; the kernel refuses a whole
listing over a name of more than 4 KB, and a name bigger than the reply buffer ended it),
or with a character UTF-8 cannot encode (a lone surrogate a hostile manifest may carry).
The rest of the listing is whole. Each directory logs one line, once per mount, with the
number left out and the first such name (shortened).

A lookup that fails with ENOENT and a `FsError.cache_for` is answered with a negative
entry (inode 0) and that entry timeout, so the kernel itself remembers that the name does
not exist. Every modifying operation answers EROFS (without ``--mount-tmp`` the mount is
also made ``ro``, so the kernel refuses most of them before they get here), except in a
``--mount-tmp`` directory, where they go to its `fedmount.fs.scratch` model.

The model reports a UUID collection whose content changed as an `Invalidation`
(`Tree.on_change`); the adapter queues it and `invalidations` (a task of the daemon's
nursery) hands it to the kernel from a worker thread: ``invalidate_inode`` drops the
attributes of directories, ``invalidate_entry`` the entries of names now of another inode
(an inode's pages never go stale: a file whose content changed gets a new number).
``fuse_invalidations`` counts what the kernel dropped, ``fuse_invalidations_unneeded`` what
it no longer held (ENOENT: never looked up, or already forgotten or replaced). Never
from the trio thread itself: the kernel waits for requests pending on those inodes, and
only the trio thread can answer them.

Lookups and readdirs of one directory reach the daemon one at a time: the kernel
serializes them unless the filesystem asks for FUSE_PARALLEL_DIROPS at init, and
libfuse 3.14 (Debian 12) never passes that flag on (it was passed from libfuse 3.16,
off unless the filesystem sets it), while pyfuse3 has no way to set it. So the model
bounds how long a lookup waits for the API (`fedmount.fs.calls`).

`mount`, `serve`, `terminate` and `close` wrap pyfuse3's lifecycle for `fedmount.mount`.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from fedmount.stats import Counter, Stats

from .context import Invalidation
from .errors import FsError
from .nodes import Attr, Entries, Handle
from .scratch import ScratchDir, ScratchFile, ScratchHandle, ScratchNode, is_scratch, open_scratch
from .tree import Tree

log = logging.getLogger("fedmount.fuse")

T = TypeVar("T")
NAME_MAX = 255  # bytes in one name, as statfs reports (f_namemax)
XATTR_NAMESPACE = b"user."  # the only extended attributes served (user.arvados.*)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _listable(name: str) -> bytes | None:
    """The name as the kernel gets it in a listing, or None if it cannot take it (see above)."""
    try:
        raw = _encode(name)
    except UnicodeEncodeError:
        return None
    return raw if len(raw) <= NAME_MAX and b"\0" not in raw else None


def _shown(name: str) -> str:
    """A name for a log line: its repr, at most 80 characters."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


class _OpenDir:
    """An open directory: its entries as of opendir, and what its listing left out."""

    __slots__ = ("inode", "entries", "skipped", "first_skipped", "_counted")

    def __init__(self, inode: int, entries: Entries):
        self.inode = inode
        self.entries = entries
        self.skipped = 0
        self.first_skipped = ""
        self._counted = 0  # left-out entries before this index are counted already

    def leave_out(self, index: int, name: str) -> bool:
        """Note that entry `index` is left out; False if an earlier readdir of it did already."""
        if index < self._counted:
            return False
        self._counted = index + 1
        self.skipped += 1
        self.first_skipped = self.first_skipped or name
        return True


def _guard(op: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    def decorate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(self: FuseOperations, *args: Any) -> T:
            started = time.monotonic()
            ops, seconds = self._counters(op)
            ops.add()
            try:
                return await fn(self, *args)
            except FsError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            except pyfuse3.FUSEError:
                raise
            except Exception as e:  # a bug: keep serving, say so once, details at debug level
                self.stats.add("fuse_unexpected_errors", op=op)
                log.error("Unhandled exception during FUSE operation %s: %s: %s", op, type(e).__name__, e)
                log.debug("traceback of the %s failure", op, exc_info=True)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                seconds.add(time.monotonic() - started)

        return handler

    return decorate


class FuseOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, stats: Stats, uid: int | None = None, gid: int | None = None):
        super().__init__()
        self.tree = tree
        self.stats = stats
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._files: dict[int, Handle] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self._reported_dirs: set[int] = set()  # directories whose left-out names were logged
        self._next_fh = 1
        self._said_read_only = False
        self._changes_in, self._changes_out = trio.open_memory_channel[Invalidation](math.inf)
        tree.on_change = self._changes_in.send_nowait
        self._op_counters: dict[str, tuple[Counter, Counter]] = {}
        self._read_bytes = stats.counter("fuse_read_bytes")

    def _counters(self, op: str) -> tuple[Counter, Counter]:
        """The ``fuse_ops`` and ``fuse_seconds`` series of `op`, bound once (stats.py)."""
        counters = self._op_counters.get(op)
        if counters is None:
            counters = self._op_counters[op] = (
                self.stats.counter("fuse_ops", op=op), self.stats.counter("fuse_seconds", op=op)
            )
        return counters

    async def invalidations(self) -> None:
        """Hand every reported `Invalidation` to the kernel, in order, from a worker thread."""
        async for change in self._changes_out:
            await trio.to_thread.run_sync(self._invalidate, change)

    def _invalidate(self, change: Invalidation) -> None:
        calls = [(pyfuse3.invalidate_inode, (ino, True), "attrs") for ino in change.attrs]
        calls += [(pyfuse3.invalidate_entry, (p, _encode(n)), "entry") for p, n in change.entries]
        for call, args, kind in calls:
            try:
                call(*args)
            except OSError as e:  # ENOENT: the kernel holds nothing of it (never looked up, forgotten)
                if e.errno != errno.ENOENT:
                    log.warning("cannot invalidate %s %s: %s", kind, args[0], e.strerror)
                else:
                    self.stats.add("fuse_invalidations_unneeded", kind=kind)
                continue
            self.stats.add("fuse_invalidations", kind=kind)

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = attr.entry_timeout
        e.attr_timeout = attr.attr_timeout
        e.st_mode = attr.mode
        e.st_nlink = 2 if attr.is_dir else 1
        e.st_uid = self.uid
        e.st_gid = self.gid
        e.st_rdev = 0
        e.st_size = attr.size
        e.st_blksize = 1 << 20
        e.st_blocks = attr.blocks
        ns = int(attr.mtime * 1e9)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    # -- reading ------------------------------------------------------------------

    @_guard("lookup")
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:  # the kernel passes names up to 1024 bytes; statfs promises 255
            raise FsError(errno.ENAMETOOLONG)
        try:
            node = await self.tree.lookup(parent_inode, _decode(name))
        except FsError as e:
            if e.errno != errno.ENOENT or not e.cache_for:
                raise
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # a negative entry the kernel keeps for entry_timeout
            negative.entry_timeout = e.cache_for
            return negative
        return self._entry(node.attr())

    @_guard("getattr")
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self.tree.getattr(inode))

    @_guard("opendir")
    async def opendir(self, inode: int, ctx: Any) -> int:
        entries = await self.tree.listdir(inode)
        fh = self._fh()
        self._dirs[fh] = _OpenDir(inode, entries)
        return fh

    @_guard("readdir")
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self._dirs[fh]
        entries = listing.entries
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            raw = _listable(name)
            if raw is None:
                if listing.leave_out(index, name):
                    self.stats.add("readdir_names_skipped")
                continue
            try:
                attr = node.attr()
            except FsError:  # went away since opendir (a UUID collection changed)
                continue
            if not pyfuse3.readdir_reply(token, raw, self._entry(attr), index + 1):
                break

    @_guard("releasedir")
    async def releasedir(self, fh: int) -> None:
        listing = self._dirs.pop(fh, None)
        if listing is not None and listing.skipped and listing.inode not in self._reported_dirs:
            self._reported_dirs.add(listing.inode)
            log.warning(
                "directory inode %d: %d entries not listed, their names cannot be served (a NUL byte, "
                "more than %d bytes, or not encodable), e.g. %s",
                listing.inode, listing.skipped, NAME_MAX, _shown(listing.first_skipped),
            )  # fmt: skip

    @_guard("open")
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if is_scratch(node):
            handle = await open_scratch(node, flags)
        elif flags & _WRITE_FLAGS:
            raise self._refused_write()
        else:
            handle = await self.tree.open(inode)
        fh = self._fh()
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache, direct_io=handle.direct_io)

    @_guard("read")
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        data = await self._files[fh].read(off, size)
        self._read_bytes.add(len(data))
        return data

    @_guard("release")
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            handle.close()

    @_guard("statfs")
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        for key, value in self.tree.statfs().items():
            setattr(out, key, value)
        return out

    @_guard("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if not name.startswith(XATTR_NAMESPACE):  # see "Extended attributes" above
            raise FsError(errno.EOPNOTSUPP)
        return self.tree.getxattr(inode, _decode(name))

    @_guard("listxattr")
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return [_encode(n) for n in self.tree.listxattr(inode)]

    @_guard("readlink")
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        raise FsError(errno.EINVAL)  # there are no symlinks

    # -- writing: only in --mount-tmp directories ---------------------------------------

    def _scratch(self, inode: int) -> ScratchNode:
        node = self.tree.node(inode)
        if not isinstance(node, ScratchNode):
            raise self._refused_write()
        return node

    def _refused_write(self) -> FsError:
        """EROFS for a write anywhere but a scratch directory, said once in the log."""
        self.stats.add("writes_refused")
        if not self._said_read_only:
            self._said_read_only = True
            log.warning("a write outside the --mount-tmp directories was refused (EROFS): collections are "
                        "read-only, and writing into an existing collection (under by_uuid/, as crunch-run's "
                        "Singularity image conversion does) is not supported")
        return FsError(errno.EROFS)

    def _scratch_dir(self, inode: int) -> ScratchDir:
        node = self._scratch(inode)
        if not isinstance(node, ScratchDir):
            raise FsError(errno.ENOTDIR)
        return node

    @_guard("create")
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int = 0,
                     ctx: Any = None) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._scratch_dir(parent_inode)
        file, handle = parent.create(_decode(name), mode, bool(flags & (os.O_WRONLY | os.O_RDWR)))
        fh = self._fh()
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh), self._entry(file.attr())

    @_guard("mknod")
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int = 0,
                    ctx: Any = None) -> pyfuse3.EntryAttributes:
        file, handle = self._scratch_dir(parent_inode).create(_decode(name), mode)
        handle.close()
        return self._entry(file.attr())

    @_guard("mkdir")
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(self._scratch_dir(parent_inode).mkdir(_decode(name), mode).attr())

    @_guard("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._scratch_dir(parent_inode).unlink(_decode(name))

    @_guard("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._scratch_dir(parent_inode).rmdir(_decode(name))

    @_guard("rename")
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int = 0,
                     name_new: bytes = b"", flags: int = 0, ctx: Any = None) -> None:
        source, target = self._scratch_dir(parent_inode_old), self._scratch_dir(parent_inode_new)
        source.rename(_decode(name_old), target, _decode(name_new), flags)

    @_guard("write")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files.get(fh)
        if not isinstance(handle, ScratchHandle):  # only scratch files are ever open for writing
            raise FsError(errno.EROFS)
        written = await handle.write(off, buf)
        self.stats.add("fuse_write_bytes", written)
        return written

    @_guard("setattr")
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None = None, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self._scratch(inode)
        if (fields.update_uid and attr.st_uid != self.uid) or (fields.update_gid and attr.st_gid != self.gid):
            raise FsError(errno.EPERM)  # every file belongs to the mount's owner
        if fields.update_size:
            if not isinstance(node, ScratchFile):
                raise FsError(errno.EISDIR)
            node.truncate(attr.st_size)
        if fields.update_mode:
            node.perm = attr.st_mode & 0o7777
        if fields.update_mtime:
            node.set_times(attr.st_mtime_ns / 1e9)
        return self._entry(node.attr())

    async def _refuse(self, *args: Any) -> Any:
        raise FsError(errno.EROFS)

    async def _no_links(self, inode: int, *args: Any) -> Any:
        self._scratch(inode)
        raise FsError(errno.EPERM)  # a collection holds no symlinks nor hard links

    symlink = _guard("symlink")(_no_links)
    link = _guard("link")(_no_links)
    setxattr = _guard("setxattr")(_refuse)
    removexattr = _guard("removexattr")(_refuse)


def mount(ops: FuseOperations, mountpoint: str, *, subtype: str, allow_other: bool,
          writable: bool = False) -> None:
    """Mount, read-only unless `writable` (a --mount-tmp directory). Raises OSError with a
    one-line reason if the kernel refuses."""
    options = {"fsname=fedmount", f"subtype={subtype}", "default_permissions"}
    if not writable:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"cannot mount on {mountpoint} ({e}); is /dev/fuse usable and the "
                                 "directory not already mounted?") from None


async def serve() -> None:
    """Run the FUSE main loop until unmounted or `terminate` is called."""
    await pyfuse3.main()


def terminate() -> None:
    pyfuse3.terminate()


def close(unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)
