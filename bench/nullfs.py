"""The FUSE ceiling: a minimal read-only pyfuse3 filesystem that serves bytes from memory.

It answers the question "how fast can *any* pyfuse3-on-trio filesystem be on this machine,
with this kernel, this read size and this read-ahead?", so every fedmount figure that goes
through FUSE is divided by the same figure measured through this filesystem in the same run.

It does as little as a filesystem can: the tree (directories and file sizes) comes from a
JSON spec, every inode and its attributes are built once at start, and a read of any file
returns a slice of one shared buffer of pseudo-random bytes (offset modulo the buffer
length), so a 1 GiB file costs no memory and no I/O. Opens do not set ``keep_cache``, so
the kernel drops the file's pages on every open and each read run really goes through
FUSE, as a cold or warm (disk-cache) fedmount read does; with ``--keep-cache`` they do, which
gives the best a FUSE file can do when the kernel keeps its pages (a second read of a
PDH-addressed collection in fedmount). Kernel attribute and entry
caching is long (the tree never changes), as fedmount's is for collections.

The same tree format lets the benchmark workloads run against this filesystem in place of
fedmount (``python -m bench --target nullfs``), which is how the workload machinery is
tested without the daemon.

    python -m bench.nullfs --spec SPEC.json [--read-ahead-kb N] [--keep-cache] MOUNTPOINT

SPEC.json is ``{"files": {"dir/sub/name": size, ...}}``. The process mounts, sets the
mount's ``read_ahead_kb`` in ``/sys/class/bdi`` when asked, serves until the mountpoint is
unmounted (``fusermount3 -u``) or it gets SIGTERM/SIGINT, and exits.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import random
import signal
import stat
import sys

import pyfuse3
import trio

PATTERN_SIZE = 16 << 20
ATTR_TIMEOUT = 3600.0


class NullFS(pyfuse3.Operations):
    def __init__(self, files: dict[str, int], keep_cache: bool = False) -> None:
        super().__init__()
        self.keep_cache = keep_cache
        self.pattern = random.Random(0).randbytes(PATTERN_SIZE)
        self.sizes: dict[int, int] = {}
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        root = pyfuse3.ROOT_INODE
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {root: self._attr(root, None)}
        next_inode = pyfuse3.ROOT_INODE + 1
        for path, size in files.items():
            parent = pyfuse3.ROOT_INODE
            *dirs, name = path.strip("/").split("/")
            for part in dirs:
                key = os.fsencode(part)
                if key not in self.children[parent]:
                    self.children[parent][key] = next_inode
                    self.children[next_inode] = {}
                    self.attrs[next_inode] = self._attr(next_inode, None)
                    next_inode += 1
                parent = self.children[parent][key]
            self.children[parent][os.fsencode(name)] = next_inode
            self.sizes[next_inode] = size
            self.attrs[next_inode] = self._attr(next_inode, size)
            next_inode += 1
        self.listings = {ino: sorted(entries.items()) for ino, entries in self.children.items()}

    @staticmethod
    def _attr(inode: int, size: int | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = (stat.S_IFDIR | 0o555) if size is None else (stat.S_IFREG | 0o444)
        attr.st_nlink = 2 if size is None else 1
        attr.st_size = size or 0
        attr.st_blksize = 1 << 20
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        return attr

    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.children.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[inode]

    async def getattr(self, inode, ctx=None):
        return self.attrs[inode]

    async def opendir(self, inode, ctx):
        if inode not in self.children:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = self.listings[fh]
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self.attrs[inode], index + 1):
                return

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        if inode not in self.sizes:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache)

    async def read(self, fh, off, size):
        end = min(off + size, self.sizes[fh])
        if end <= off:
            return b""
        start = off % PATTERN_SIZE
        if start + (end - off) <= PATTERN_SIZE:
            return self.pattern[start : start + end - off]
        return (self.pattern[start:] + self.pattern * ((end - off) // PATTERN_SIZE + 1))[: end - off]

    async def release(self, fh):
        return None

    async def statfs(self, ctx):
        result = pyfuse3.StatvfsData()
        result.f_bsize = 1 << 20
        result.f_frsize = 1 << 20
        result.f_namemax = 255
        return result


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Write `kib` to the mount's backing-device read_ahead_kb (``/sys/class/bdi/MAJ:MIN``)."""
    dev = os.stat(mountpoint).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
        f.write(str(kib))


async def serve(mountpoint: str, read_ahead_kb: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        if read_ahead_kb is not None:
            # stat() of the mountpoint needs the main loop to answer, hence a thread.
            nursery.start_soon(trio.to_thread.run_sync, set_read_ahead, mountpoint, read_ahead_kb)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nullfs", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help='JSON file {"files": {"path": size}}')
    parser.add_argument("--read-ahead-kb", type=int, default=None)
    parser.add_argument(
        "--keep-cache", action="store_true", help="let the kernel keep file pages across opens"
    )
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as f:
        files = json.load(f)["files"]
    fs = NullFS(files, keep_cache=args.keep_cache)
    del files
    gc.freeze()  # the tree lives as long as the process: keep the collector from walking it
    pyfuse3.init(fs, args.mountpoint, set(pyfuse3.default_options) | {"fsname=bench-nullfs", "ro"})
    try:
        trio.run(serve, args.mountpoint, args.read_ahead_kb)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
