"""The generic parts of the filesystem model: nodes, their attributes, open files.

A `Node` has an inode number and attributes; a `DirNode` answers lookups and lists its
`Entries` (read by index, so that a readdir can resume and a huge listing needs no list of
nodes); a `FileNode` opens into a `Handle`. `GeneratedFile` (bytes from a function: READMEs,
stats, collection records) and `StaticDir` (a fixed set of entries) are the nodes that are
not collection content. Nodes know nothing of the mount: what they need (a time, a negative
cache timeout) they are given when made, so that every other module of the fs can build on
this one without an import circle.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import FsError

FOREVER = 10 * 365 * 86400.0  # "infinite" kernel cache timeout


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    is_dir: bool
    size: int
    mtime: float
    entry_timeout: float
    attr_timeout: float
    executable: bool = False  # a collection file: 0555, as arv-mount serves it (scripts run)

    @property
    def mode(self) -> int:
        if self.is_dir:
            return stat.S_IFDIR | 0o555
        return stat.S_IFREG | (0o555 if self.executable else 0o444)

    @property
    def blocks(self) -> int:
        """512-byte blocks, as st_blocks counts them."""
        return (self.size + 511) // 512


class Node:
    """Something with an inode number and attributes. (Empty ``__slots__`` here and in
    `DirNode`: a subclass with its own keeps no per-instance dict, which counts for the
    many nodes of listed directories.)"""

    __slots__ = ()
    ino: int
    is_dir = False

    async def fresh(self) -> None:
        """Bring the node up to date (a UUID collection may re-fetch itself)."""

    def attr(self) -> Attr:
        raise NotImplementedError

    def xattr_names(self) -> list[str]:
        return []

    def xattr(self, name: str) -> bytes:
        raise FsError(errno.ENODATA)


class Entries(Protocol):
    """A directory's entries, read by index (`readdir` resumes at an index)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[str, Node]: ...


class DirNode(Node):
    __slots__ = ()
    is_dir = True

    async def lookup(self, name: str) -> Node:
        raise NotImplementedError

    async def entries(self) -> Entries:
        raise NotImplementedError


class Handle:
    """An open file."""

    keep_cache = False
    direct_io = False

    async def read(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileNode(Node):
    """A node that opens: every node that is not a directory."""

    async def open(self) -> Handle:
        raise NotImplementedError


class BytesHandle(Handle):
    """An open generated file: the bytes as they were when it was opened."""

    def __init__(self, data: bytes, keep_cache: bool, direct_io: bool):
        self._data = data
        self.keep_cache = keep_cache
        self.direct_io = direct_io

    async def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]


class GeneratedFile(FileNode):
    """A file whose bytes come from a function: READMEs, stats, collection records.

    `static` files (READMEs) never change and are cached by the kernel like PDH content;
    the others are regenerated at each open and read with direct I/O, so their size in
    `stat` is only an indication."""

    def __init__(self, ino: int, content: Callable[[], bytes], *, static: bool,
                 mtime: Callable[[], float], entry_timeout: float = FOREVER):
        self.ino = ino
        self._content = content
        self.static = static
        self._mtime = mtime
        self._entry_timeout = entry_timeout

    def attr(self) -> Attr:
        return Attr(self.ino, False, len(self._content()), self._mtime(), self._entry_timeout,
                    FOREVER if self.static else 0.0)

    async def open(self) -> Handle:
        return BytesHandle(self._content(), keep_cache=self.static, direct_io=not self.static)


class StaticDir(DirNode):
    """A directory with a fixed set of entries (the root, ``.fedmount``); `hidden` ones
    answer a lookup but are not listed. A name it does not have is cached as absent for
    `negative_ttl` seconds."""

    def __init__(self, ino: int, entries: dict[str, Node], *, mtime: float, negative_ttl: float,
                 hidden: dict[str, Node] | None = None):
        self.ino = ino
        self.children = entries
        self.hidden = hidden or {}
        self.mtime = mtime
        self.negative_ttl = negative_ttl

    def attr(self) -> Attr:
        return Attr(self.ino, True, 0, self.mtime, FOREVER, FOREVER)

    async def lookup(self, name: str) -> Node:
        node = self.children.get(name) or self.hidden.get(name)
        if node is None:
            raise FsError(errno.ENOENT, cache_for=self.negative_ttl)
        return node

    async def entries(self) -> list[tuple[str, Node]]:
        return list(self.children.items())
