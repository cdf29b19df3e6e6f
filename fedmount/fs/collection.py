"""One mounted collection: its lifecycle (re-checks, signatures, generations) and its nodes.

A `Collection` holds its `KeptRecord` and parsed manifest; its directories and files
(`CollectionDir`, `CollectionFile`) hold only their path, resolve it in the current
manifest and answer ENOENT if it went away. Their inode numbers come from `fs/listing.py`.

Freshness
    A collection addressed by PDH never changes: its entries and attributes may be cached
    by the kernel for the life of the mount. A collection addressed by UUID is re-checked
    when touched after ``refresh_time`` (`CollectionLoader.recheck`: unchanged, nothing is
    parsed; a new PDH replaces the manifest, the next *generation*). The kernel caches
    entries and attributes for ``refresh_time``.

    The re-check is an API call in the background (`fedmount.fs.calls`): lookup, getattr,
    opendir and open wait for it only until its deadline and are then answered from the
    generation the mount has; a read never waits for it (the handle keeps its snapshot
    anyway) unless the signatures are due. So a stalled API costs what a down one costs: at
    most one deadline per re-check.

    Every collection file is opened with ``keep_cache``, so a second read is served from
    the page cache, and the rule is: after a refresh no new open sees a byte of the old
    version, and a handle opened before never sees a byte of the new one. Both hold because
    an inode number names one content for the life of the mount. A refresh that moves a
    UUID collection to another PDH compares every entry the mount has numbered with the new
    manifest: a file whose blocks changed, that vanished or changed kind is *retired*
    (`Listing.retire`): its number becomes a `SupersededFile` that keeps that version's
    attributes for the handles still open on it (they read their snapshot, so its pages are
    that version's) and answers ESTALE to a new open; the name gets a new number. The
    refresh reports an `Invalidation` to the mount's change sink (the names whose number
    changed lose their directory entry, the directories their attributes) and the adapter
    passes it to the kernel, so a new lookup finds the new number; an open that races it on
    the old number gets ESTALE, on which the kernel looks the path up again.

    Block signatures expire. Every collection records the earliest ``+A``/``+R`` expiry of
    its manifest (`Manifest.earliest_signature_expiry`) and re-fetches itself when half of
    the time left has passed (`RefreshPolicy.signatures_refresh_at`), whatever its kind.
    Open files keep working: a handle notices the new generation at its next read and, if
    the file's blocks are the same (same ``hash+size``, offsets and lengths), reopens its
    block reader on the new, freshly signed segments; if the file's content changed (UUID
    collection), the handle keeps reading the snapshot it opened. The signatures are in the
    manifest text, so a signature refresh always fetches the whole record.

    A refresh that fails keeps the old manifest (its signatures may well still be valid),
    logs one line and is retried after `RETRY_AFTER_ERROR` seconds.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Hashable

from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import CollectionId
from fedmount.arvados.manifest import Directory, File, Manifest
from fedmount.memory import release

from .calls import Call
from .context import RETRY_AFTER_ERROR, Invalidation, MountContext
from .errors import FsError, block_failure
from .inodes import InodeTable
from .listing import CollectionDirEntries, Listing
from .loader import CollectionLoader, KeptRecord, api_group
from .nodes import FOREVER, Attr, DirNode, Entries, FileNode, GeneratedFile, Handle, Node

log = logging.getLogger("fedmount.fs")

XATTR_PREFIX = "user.arvados."
COLLECTION_RECORD_NAME = ".arvados#collection"


def _segment_keys(file: File) -> list[tuple[str, int, int]]:
    return [(s.locator.key, s.block_offset, s.length) for s in file.segments()]


class Collection:
    """One mounted collection: its record, parsed manifest, generation and refresh times.

    `hidden` entries of its root answer a lookup without being listed (besides its
    ``.arvados#collection``): the mount's ``.fedmount`` when the collection is the root."""

    def __init__(self, context: MountContext, loader: CollectionLoader, cid: CollectionId, key: Hashable,
                 root_ino: int, record: KeptRecord, manifest: Manifest,
                 hidden: dict[str, Node] | None = None):
        self.context = context
        self.loader = loader
        self.cid = cid
        self.key = key
        self.record = record
        self.manifest = manifest
        self.generation = 0
        self._recheck: Call[None] | None = None  # the re-check running in the background
        self._listings: dict[str, Listing] = {}  # by directory path, once the kernel looked into it
        self._set_times(manifest.earliest_signature_expiry)
        table = context.table
        self.root = CollectionDir(self, "", root_ino)
        table.bind(root_ino, self.root)
        record_ino = table.number((key, COLLECTION_RECORD_NAME))
        self.record_file = GeneratedFile(record_ino, self._record_json, static=False,
                                         mtime=self.mtime, entry_timeout=self.timeout)
        table.bind(record_ino, self.record_file)
        self.hidden = {COLLECTION_RECORD_NAME: self.record_file, **(hidden or {})}
        if not self.immutable:
            loader.track(self)

    @property
    def table(self) -> InodeTable[Node]:
        return self.context.table

    @property
    def immutable(self) -> bool:
        return self.cid.is_pdh

    @property
    def timeout(self) -> float:
        return self.context.policy.timeout(self.immutable)

    def mtime(self) -> float:
        return self.record.modified_at or self.context.started

    def describe(self) -> str:
        return f"collection {self.cid} (cluster {self.record.cluster})"

    def _record_json(self) -> bytes:
        return (json.dumps(self.record.answer(), indent=1, sort_keys=True) + "\n").encode()

    def _set_times(self, expiry: int | None) -> None:
        context = self.context
        self.checked_at = context.clock()
        self.signatures_refresh_at = context.policy.signatures_refresh_at(expiry, context.wall())

    def _due(self) -> bool:
        if self.signatures_due():
            return True
        context = self.context
        return not self.immutable and context.clock() - self.checked_at >= context.policy.refresh_time

    def signatures_due(self) -> bool:
        return self.context.wall() >= self.signatures_refresh_at

    async def fresh(self, wait: bool = True) -> None:
        """Start a re-check of the record if one is due (UUID re-check or signature
        half-life); with `wait`, wait for it until its deadline (`Calls`). Past that, the
        current generation is served and the re-check goes on in the background: a stalled
        API costs the operations of one deadline, as a down one does. Raises FsError ENOENT
        if the re-check found a UUID collection deleted."""
        calls = self.context.calls
        call = self._recheck
        if call is None:
            if not self._due():
                return
            what = f"re-check of {self.describe()}"
            call = self._recheck = calls.start(api_group(self.cid), what, self._refresh)
        if not wait:
            return
        if await call.wait():
            call.result()
        elif call.first_late_answer():
            self.context.stats.add("api_calls_late", op="recheck", cluster=api_group(self.cid))
            log.warning("%s: no answer from the API within %gs; serving the version we have while the "
                        "re-check goes on", self.describe(), calls.wait)

    async def _refresh(self) -> None:
        try:
            await self._refresh_now()
        finally:
            self._recheck = None

    async def _refresh_now(self) -> None:
        context = self.context
        signatures_due = self.signatures_due()
        context.stats.add("collection_refreshes")
        known = None if signatures_due else self.record  # parse again only if due or changed
        try:
            record, manifest = await self.loader.recheck(self.cid, known)
        except FsError as e:
            if e.errno == errno.ENOENT and not self.immutable:
                raise
            # Keep serving what we have (the loader logged why); try again a little later.
            self.checked_at = context.clock()
            if signatures_due:
                self.signatures_refresh_at = context.wall() + RETRY_AFTER_ERROR
            return
        changed = record.portable_data_hash != self.record.portable_data_hash
        if manifest is None:
            self.record = record
            self.checked_at = context.clock()
            return
        if changed:
            log.info("%s changed: %s -> %s", self.describe(), self.record.portable_data_hash,
                     record.portable_data_hash)
        old, old_mtime = self.manifest, self.mtime()
        self.record, self.manifest = record, manifest
        self.generation += 1
        self._set_times(manifest.earliest_signature_expiry)
        if changed:
            context.on_change(self._renumber_changed(old, old_mtime))
        del old
        release()  # what no listing or open file still holds of the old generation

    def listing(self, directory_node: CollectionDir, directory: Directory) -> Listing:
        """The inode range of a directory's entries; numbered from `directory` the first time."""
        listing = self._listings.get(directory_node.path)
        if listing is None:
            listing = Listing(self, directory_node.path, directory_node.ino, directory)
            self._listings[directory_node.path] = listing
        return listing

    def entry_node(self, path: str, is_dir: bool, ino: int, file: File | None) -> Node:
        """The node of an entry of this collection (`ListingOwner`)."""
        return CollectionDir(self, path, ino) if is_dir else CollectionFile(self, path, ino, file)

    def superseded_node(self, path: str, ino: int, size: int, mtime: float) -> Node:
        """What a retired file number becomes (`ListingOwner`)."""
        return SupersededFile(self, path, ino, size, mtime)

    def resolve(self, path: str, manifest: Manifest | None = None) -> Directory | File | None:
        """The entry at `path` in `manifest` (default: the current one)."""
        manifest = manifest or self.manifest
        return manifest.find(path) if path else manifest.root

    def _renumber_changed(self, old: Manifest, old_mtime: float) -> Invalidation:
        """After `old` -> current: every file whose content changed, vanished or changed
        kind loses its number (`Listing.retire`), and the kernel must forget that name's
        directory entry. Every numbered entry of every directory the kernel looked into is
        compared."""
        out = Invalidation([], [])
        for path, listing in self._listings.items():
            out.attrs.append(listing.ino)  # its entries (and the collection's mtime) changed
            before_dir, after_dir = self.resolve(path, old), self.resolve(path)
            for name, is_dir, ino in list(listing.numbered()):  # retiring changes what is numbered
                before = before_dir.get(name) if isinstance(before_dir, Directory) else None
                after = after_dir.get(name) if isinstance(after_dir, Directory) else None
                if before is None or isinstance(before, Directory) != is_dir:
                    continue  # not this entry before the change: the kernel holds nothing of it
                if after is not None and isinstance(after, Directory) == is_dir:
                    if is_dir or _segment_keys(before) == _segment_keys(after):  # type: ignore[arg-type]
                        continue  # the same entry, the same content
                out.entries.append((listing.ino, name))
                if isinstance(before, File):
                    listing.retire(name, ino, before.size, old_mtime)
        return out

    def xattr_names(self) -> list[str]:
        return [XATTR_PREFIX + n for n in ("uuid", "portable_data_hash", "cluster")]

    def xattr(self, name: str) -> bytes:
        values = {
            "uuid": self.record.uuid,
            "portable_data_hash": self.record.portable_data_hash,
            "cluster": self.record.cluster,
        }
        value = values.get(name.removeprefix(XATTR_PREFIX)) if name.startswith(XATTR_PREFIX) else None
        if value is None:
            raise FsError(errno.ENODATA)
        return value.encode()


class CollectionDir(DirNode):
    def __init__(self, coll: Collection, path: str, ino: int):
        self.coll = coll
        self.path = path
        self.ino = ino

    async def fresh(self) -> None:
        await self.coll.fresh()

    def _dir(self) -> Directory:
        entry = self.coll.resolve(self.path)
        if not isinstance(entry, Directory):
            raise FsError(errno.ENOENT, f"{self.coll.describe()}: {self.path} is gone")
        return entry

    def attr(self) -> Attr:
        return Attr(self.ino, True, 0, self.coll.mtime(), self.coll.timeout, self.coll.timeout)

    async def lookup(self, name: str) -> Node:
        await self.coll.fresh()
        directory = self._dir()
        entry = directory.get(name)
        if entry is not None:
            return self.coll.listing(self, directory).node(name, entry, self.coll.generation)
        if self.path == "" and name in self.coll.hidden:
            return self.coll.hidden[name]
        raise FsError(errno.ENOENT, cache_for=self.coll.timeout)

    async def entries(self) -> Entries:
        await self.coll.fresh()
        directory = self._dir()
        return CollectionDirEntries(self.coll.listing(self, directory), directory)

    def xattr_names(self) -> list[str]:
        return self.coll.xattr_names()

    def xattr(self, name: str) -> bytes:
        return self.coll.xattr(name)


class CollectionFile(FileNode):
    def __init__(self, coll: Collection, path: str, ino: int, file: File | None = None):
        self.coll = coll
        self.path = path
        self.ino = ino
        self._generation = -1 if file is None else coll.generation  # `file` is of the current one
        self._file = file

    async def fresh(self) -> None:
        await self.coll.fresh()

    @property
    def file(self) -> File:
        """The manifest file at this path in the collection's current generation."""
        if self._generation != self.coll.generation:
            entry = self.coll.resolve(self.path)
            self._file = entry if isinstance(entry, File) else None
            self._generation = self.coll.generation
        if self._file is None:
            raise FsError(errno.ENOENT, f"{self.coll.describe()}: {self.path} is gone")
        return self._file

    def attr(self) -> Attr:
        return Attr(self.ino, False, self.file.size, self.coll.mtime(), self.coll.timeout, self.coll.timeout,
                    executable=True)

    async def open(self) -> Handle:
        await self.coll.fresh()
        current = self.coll.table.get(self.ino)
        if isinstance(current, SupersededFile):  # that refresh changed this file's content
            return await current.open()
        return CollectionFileHandle(self)

    def xattr_names(self) -> list[str]:
        return self.coll.xattr_names() + [XATTR_PREFIX + "locators", XATTR_PREFIX + "cached_bytes"]

    def xattr(self, name: str) -> bytes:
        if name == XATTR_PREFIX + "locators":
            keys = dict.fromkeys(s.locator.key for s in self.file.segments())
            return " ".join(keys).encode()
        if name == XATTR_PREFIX + "cached_bytes":
            cached = self.coll.context.cached_bytes
            total = 0
            for s in self.file.segments():
                have = cached(s.locator.key)
                total += s.length if have >= s.locator.size else s.length * have // max(s.locator.size, 1)
            return str(total).encode()
        return self.coll.xattr(name)


class SupersededFile(FileNode):
    """A number that named a UUID collection's file until its content changed (or it went
    away): it keeps that version's attributes for the handles still open on it, which read
    that version (so its pages in the kernel are that version's), and refuses to be opened
    again or asked for xattrs with ESTALE. On ESTALE the kernel looks the path up again
    (LOOKUP_REVAL) and finds the file's current number, if any."""

    def __init__(self, coll: Collection, path: str, ino: int, size: int, mtime: float):
        self.coll = coll
        self.path = path
        self.ino = ino
        self.size = size
        self.mtime = mtime

    def attr(self) -> Attr:
        return Attr(self.ino, False, self.size, self.mtime, 0.0, FOREVER)  # this version never changes

    def _stale(self) -> FsError:
        return FsError(errno.ESTALE, f"{self.coll.describe()}: {self.path} changed since it was looked up")

    async def open(self) -> Handle:
        raise self._stale()

    def xattr_names(self) -> list[str]:
        raise self._stale()

    def xattr(self, name: str) -> bytes:
        raise self._stale()


class CollectionFileHandle(Handle):
    """An open collection file: a block reader over the file as it was at open time.

    When the collection moves to a new generation (refreshed signatures, or a UUID
    collection that changed), the next read reopens the reader on the new segments if the
    file's blocks are the same; otherwise the handle keeps its snapshot."""

    def __init__(self, node: CollectionFile):
        self.node = node
        self.coll = node.coll
        self.keep_cache = True  # the content of a number never changes (Listing.retire)
        self._file = node.file
        self._generation = self.coll.generation
        self._reader = self.coll.context.reader.open(self._file, self.coll.record.route)

    async def read(self, offset: int, size: int) -> bytes:
        coll = self.coll
        # This handle reads its snapshot whatever a re-check finds; only fresh signatures matter.
        await coll.fresh(wait=coll.signatures_due())
        if coll.generation != self._generation:
            self._generation = coll.generation
            try:
                new = self.node.file
            except FsError:
                new = None
            if new is not None and _segment_keys(new) == _segment_keys(self._file):
                self._reader.close()
                self._file = new
                self._reader = coll.context.reader.open(new, coll.record.route)
        try:
            return await self._reader.read(offset, size)
        except BlockError as e:
            coll.context.stats.add("read_errors", cluster=coll.record.route.cluster)
            failure = block_failure(e, f"{coll.describe()}: reading {self.node.path}")
            log.error("%s", failure)
            raise failure from e

    def close(self) -> None:
        self._reader.close()
