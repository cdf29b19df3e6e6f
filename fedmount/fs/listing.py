"""Inode numbers for the entries of collection directories, with nothing kept per entry.

The first time the kernel looks into a collection directory (lookup or readdir), its
`Listing` takes one range of inode numbers (`InodeTable.allocate`), one per entry of the
manifest directory as it is then: sub-directories first, then files by their index in the
directory's packed arrays (`File.index`). A number is turned back into a node on demand
(`Listing.node_at`: its name from the manifest's arrays), and the nodes the adapter gets
are short-lived. Listings are kept by directory path for the life of the mount, so numbers
survive manifest refreshes; a name that a refresh added, or whose kind changed, gets a
keyed single number of its own (`extra`), and so does a file whose content changed: its
old number is `retire`d and becomes the owner's superseded node, which keeps that version's
attributes for the handles still open on it.

A `Listing` makes its nodes through its `ListingOwner` (the collection), so this module
knows nothing of what a collection node is.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from itertools import takewhile
from typing import Protocol

from fedmount.arvados.manifest import Directory, File

from .inodes import InodeTable
from .nodes import Node


class ListingOwner(Protocol):
    """The collection whose directories are listed, and the maker of their nodes."""

    key: Hashable  # names the collection in the keys of its entries' single numbers
    generation: int  # of the collection's current manifest

    @property
    def table(self) -> InodeTable[Node]: ...

    def entry_node(self, path: str, is_dir: bool, ino: int, file: File | None) -> Node:
        """The node of the entry at `path` with number `ino`; `file`, if given, is its file
        in the current manifest."""
        ...

    def superseded_node(self, path: str, ino: int, size: int, mtime: float) -> Node:
        """What number `ino` is once the file at `path` it named (of that size and time) changed."""
        ...


def subdir_names(directory: Directory) -> list[str]:
    """`directory`'s sub-directory names in `Directory.entries` order (they come first)."""
    return [name for name, _ in takewhile(lambda e: isinstance(e[1], Directory), directory.entries())]


class Listing:
    """One collection directory's entries numbered as one inode range (see the module docstring).

    Entry i of the range is entry i of `snapshot`, the manifest directory as it was when
    the kernel first looked into it."""

    __slots__ = ("owner", "path", "ino", "snapshot", "subdirs", "subdir_index", "start", "extra", "retired")

    def __init__(self, owner: ListingOwner, path: str, ino: int, snapshot: Directory):
        self.owner = owner
        self.path = path  # of the directory in its collection, "" for the root
        self.ino = ino  # of the directory
        self.snapshot = snapshot
        self.subdirs = subdir_names(snapshot)
        self.subdir_index = {name: i for i, name in enumerate(self.subdirs)}
        self.start = owner.table.allocate(len(snapshot), self)
        self.extra: dict[tuple[str, bool], int] = {}  # current numbers outside the range
        self.retired: set[int] = set()  # numbers of file versions that are no longer current

    def child_path(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def _index(self, name: str, is_dir: bool) -> int | None:
        """Where `name` of that kind is in the snapshot, or None."""
        if is_dir:
            return self.subdir_index.get(name)
        entry = self.snapshot.get(name)
        return len(self.subdirs) + entry.index if isinstance(entry, File) else None

    def _make(self, name: str, entry: Directory | File | None, is_dir: bool, ino: int) -> Node:
        """A node for `ino`; `entry`, if given, is the name's entry in the current manifest."""
        file = entry if isinstance(entry, File) else None
        return self.owner.entry_node(self.child_path(name), is_dir, ino, file)

    def node(self, name: str, entry: Directory | File, generation: int) -> Node:
        """The node of entry `name` of the directory of that collection generation."""
        owner = self.owner
        is_dir = isinstance(entry, Directory)
        # An older generation's entry (a readdir begun before a refresh): the node resolves its path.
        current = entry if generation == owner.generation else None
        ino = self.extra.get((name, is_dir))
        if ino is None:
            index = self._index(name, is_dir)
            if index is not None and self.start + index not in self.retired:
                return self._make(name, current, is_dir, self.start + index)
            key = (owner.key, self.child_path(name), is_dir, owner.generation)
            ino = self.extra[(name, is_dir)] = owner.table.number(key)
            owner.table.bind(ino, self._make(name, None, is_dir, ino))
        return self._make(name, current, is_dir, ino)

    def retire(self, name: str, ino: int, size: int, mtime: float) -> None:
        """File `name`'s number `ino` no longer names its current content: from now on it
        is the owner's superseded node (the version the handles opened on it read), and the
        name gets a new number when it is next asked for."""
        self.retired.add(ino)
        if self.extra.get((name, False)) == ino:
            del self.extra[(name, False)]
        self.owner.table.bind(ino, self.owner.superseded_node(self.child_path(name), ino, size, mtime))

    def node_at(self, ino: int) -> Node:
        """The node of a number of this range (`InodeTable.get`)."""
        i = ino - self.start
        if i < len(self.subdirs):
            return self._make(self.subdirs[i], None, True, ino)
        file = File(self.snapshot, i - len(self.subdirs))
        return self._make(file.name, None, False, ino)

    def numbered(self) -> Iterator[tuple[str, bool, int]]:
        """(name, is_dir, inode) of every entry this listing has numbered, current numbers only."""
        for i, (name, entry) in enumerate(self.snapshot.entries()):
            if self.start + i not in self.retired:
                yield name, isinstance(entry, Directory), self.start + i
        for (name, is_dir), ino in self.extra.items():
            yield name, is_dir, ino


class CollectionDirEntries:
    """A collection directory's entries as of `opendir`, made into nodes one at a time."""

    def __init__(self, listing: Listing, directory: Directory):
        self.listing = listing
        self.directory = directory
        self.generation = listing.owner.generation
        self.subdirs = listing.subdirs if directory is listing.snapshot else subdir_names(directory)

    def __len__(self) -> int:
        return len(self.directory)

    def __getitem__(self, index: int) -> tuple[str, Node]:
        if index < len(self.subdirs):
            name = self.subdirs[index]
            entry = self.directory.get(name)
            assert entry is not None
        else:
            entry = File(self.directory, index - len(self.subdirs))
            name = entry.name
        return name, self.listing.node(name, entry, self.generation)
