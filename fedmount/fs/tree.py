"""The filesystem as a plain async model: what each inode is, what it contains, how fresh.

The pyfuse3 adapter (`fuse.py`) is a thin shell over `Tree`; unit tests drive `Tree`
directly with small fakes of the federation and the block reader.

Layout
    The default root holds ``README`` and ``by_id/``. A lookup of any collection UUID or
    PDH under ``by_id/`` resolves it through ``Federation.get_collection`` and from then on
    the collection is listed there, under its canonical id: every spelling of a PDH (with
    hints, with leading zeros in the size) is that one collection, loaded once.
    ``--mount-by-id DIR`` / ``--mount-by-pdh DIR`` build a root of such directories
    instead (``by_pdh`` refuses UUIDs), as crunch-run uses them; ``--collection ID`` puts
    one collection at the root. ``by_id/README`` exists only once the mount is ready
    (crunch-run polls for it). Every collection root has arv-mount's
    hidden ``.arvados#collection`` (the API record as JSON), and the mount root has a
    hidden ``.fedmount/stats.json`` (the daemon's `Stats`); readdir lists neither.

Inodes
    Nothing is kept per collection entry, so a mount can list millions of them (see
    `InodeTable`). The first time the kernel looks into a collection directory (lookup or
    readdir), its `Listing` takes one range of inode numbers, one per entry of the
    manifest directory as it is then; a number is turned back into a node on demand
    (name from the manifest's packed arrays, attributes derived from the manifest), and
    the node objects the adapter gets are short-lived. Listings are kept by directory
    path for the life of the mount, so numbers survive manifest refreshes; a name that a
    refresh added, whose kind or whose content changed, gets a number of its own. A node
    of a collection holds only its path; it resolves the path in the collection's current
    manifest and answers ENOENT if the path went away.

Freshness
    A collection addressed by PDH never changes: its entries and attributes may be cached
    by the kernel for the life of the mount. A collection addressed by UUID is re-checked
    when touched after ``refresh_time``: the re-check asks only for what decides freshness
    (``Federation.get_summary`` of `FRESHNESS_FIELDS`, the API's ``select``: uuid, portable
    data hash, modification time; about 200 bytes, whatever the size of the collection or
    of its description). Unchanged, nothing else is asked for or parsed; if only the time
    changed (a rename, a new description), the record's other kept fields are fetched
    without the manifest; if the PDH changed, the whole record is fetched and its manifest
    replaces the old one (next generation). The kernel caches entries and attributes for
    ``refresh_time``.

    The re-check is an API call in the background (`fedmount.fs.calls`): lookup, getattr,
    opendir and open wait for it only until its deadline (``api_wait`` after it started,
    or none while the cluster is stalled) and are then answered from the generation the
    mount has; a read never waits for it (the handle keeps its snapshot anyway) unless the
    signatures are due. So a stalled API costs what a down one costs: at most one deadline
    per re-check. Loading a collection not yet mounted (a lookup under ``by_id/``) is such a
    call too; past its deadline the lookup answers ETIMEDOUT, and the call goes on for the
    next lookup.

    Every collection file is opened with ``keep_cache``, so a second read is served from
    the page cache, and the rule is: after a refresh no new open sees a byte of the old
    version, and a handle opened before never sees a byte of the new one. Both hold because
    an inode number names one content for the life of the mount. A refresh that moves a
    UUID collection to another PDH compares every entry the mount has numbered with the new
    manifest: a file whose blocks changed, that vanished or changed kind is *retired*
    (`Listing.retire`): its number becomes a `SupersededFile` that keeps that version's
    attributes for the handles still open on it (they read their snapshot, so its pages are
    that version's) and answers ESTALE to a new open; the name gets a new number. The
    refresh reports an `Invalidation` to ``Tree.on_change`` (the names whose number changed
    lose their directory entry, the directories their attributes) and the adapter passes
    it to the kernel, so a new lookup finds the new number; an open that races it on the old
    number gets ESTALE, on which the kernel looks the path up again and opens the new one.

    Block signatures expire. Every collection records the earliest ``+A``/``+R`` expiry of
    its manifest and re-fetches itself when half of the time left has passed (never more
    often than `MIN_SIGNATURE_REFRESH`), whatever its kind. Open files keep working: a
    handle notices the new generation at its next read and, if the file's blocks are the
    same (same ``hash+size``, offsets and lengths), reopens its block reader on the new,
    freshly signed segments; if the file's content changed (UUID collection), the handle
    keeps reading the snapshot it opened. The signatures are in the manifest text, so a
    signature refresh always fetches the whole record.

    A refresh that fails keeps the old manifest (its signatures may well still be valid),
    logs one line and is retried after `RETRY_AFTER_ERROR` seconds.

Memory
    A mounted collection keeps its parsed manifest (`fedmount.arvados.manifest`) and a
    `KeptRecord`: the API record, which only ``.arvados#collection`` reads, kept
    zlib-compressed (its manifest text and its other fields apart). A UUID re-check whose
    answer has the same PDH (and whose signatures are not due) transfers and parses no
    manifest. Every fetch ends with `fedmount.memory.release`, once the answer and the
    parse's temporaries are garbage. With a 1,000,000-file collection (25.4 MB manifest),
    loading it and a ``find`` over it used to leave the daemon 146-170 MB above its idle
    39.6 MB (the text; the tree and HTTP body of a re-check that found nothing new; the
    heap they left free); now 40 MB: the 30.7 MB tree and the 5.4 MB compressed text
    (80 MB in all, 3.2x the manifest).

Negative answers
    Names that cannot be a collection id (`parse_collection_id`) are refused without
    any API call. A collection id the API does not know is remembered for
    ``negative_ttl`` seconds in a `NegativeCache`, and `FsError.cache_for` tells the
    adapter that the kernel may cache the negative entry for as long.

Errors
    Everything that fails raises `FsError(errno)`: unknown ids ENOENT, expired or wrong
    tokens EACCES, unreachable clusters, block errors, malformed manifests and records whose
    manifest does not hash to the PDH they claim EIO, a collection still loading past its
    deadline ETIMEDOUT. The failure is logged in one line naming the collection and the
    cluster; nothing else in the mount is affected.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import stat
import time
import zlib
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any, Protocol, TypeVar

import trio

from fedmount.arvados.errors import ApiError, BlockError
from fedmount.arvados.ids import CollectionId, IdError, parse_collection_id
from fedmount.arvados.manifest import Directory, File, Manifest, ManifestError, parse_manifest
from fedmount.arvados.routes import KeepRoute
from fedmount.memory import release
from fedmount.stats import Stats

from .calls import DEFAULT_API_WAIT, Call, Calls
from .errors import FsError, api_errno, block_failure
from .inodes import ROOT_INODE, InodeTable, NegativeCache

log = logging.getLogger("fedmount.fs")
T = TypeVar("T")

FOREVER = 10 * 365 * 86400.0  # "infinite" kernel cache timeout
MIN_SIGNATURE_REFRESH = 2.0
RETRY_AFTER_ERROR = 30.0
XATTR_PREFIX = "user.arvados."
COLLECTION_RECORD_NAME = ".arvados#collection"
STATS_DIR_NAME = ".fedmount"
STATS_FILE_NAME = "stats.json"
BLOCK_SIZE = 4096  # statfs unit
# statfs: inodes are numbered on demand without a limit, so there are always this many free
# (df -i shows the mount nearly empty; 0 free would look full to monitoring). Kept below
# 2**32 with the used ones, so that 32-bit statfs callers get no EOVERFLOW.
FREE_INODES = 1 << 30
_ALWAYS_SELECTED = frozenset({"kind", "etag", "writable_by"})  # in every answer with `select`
FRESHNESS_FIELDS = ("modified_at", "portable_data_hash", "uuid")  # what a re-check asks first
_SIGNATURE_EXPIRY_RE = re.compile(r"\+[AR][0-9a-z-]*@([0-9a-f]{8})\b")


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


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What the kernel must forget after a UUID collection changed its content."""

    attrs: list[int]  # directories whose attributes (and entries) are stale
    entries: list[tuple[int, str]]  # (parent inode, name) of paths now of another inode, or none


class CollectionSummaryLike(Protocol):
    uuid: str
    portable_data_hash: str
    modified_at: float | None
    cluster: str
    record: dict[str, Any]
    route: KeepRoute


class CollectionRecordLike(CollectionSummaryLike, Protocol):
    manifest_text: str


class FederationLike(Protocol):
    async def get_collection(self, cid: CollectionId) -> CollectionRecordLike: ...
    async def get_summary(self, cid: CollectionId, fields: Sequence[str]) -> CollectionSummaryLike: ...


class FileReaderLike(Protocol):
    async def read(self, offset: int, size: int) -> bytes: ...
    def close(self) -> None: ...


class BlockReaderLike(Protocol):
    def open(self, file: File, route: KeepRoute) -> FileReaderLike: ...


@dataclass
class Layout:
    """What the root holds: one collection, custom by-id/by-pdh directories, or the default."""

    collection: str | None = None
    by_id: list[str] = field(default_factory=list)
    by_pdh: list[str] = field(default_factory=list)


ROOT_README = """\
This is a fedmount: read-only access to Arvados collections of every cluster of a federation.

  by_id/<collection UUID or portable data hash>/   one collection, from any cluster

by_id/ starts out empty: look a collection up by name (ls, cd, cat) and it appears.
Collections addressed by portable data hash never change and are cached by the kernel;
collections addressed by UUID are re-checked every few seconds.

Each collection directory has a hidden .arvados#collection file (its API record as JSON).
Extended attributes (getfattr -d FILE) under user.arvados.* give the collection's uuid,
portable data hash and cluster, a file's block locators and how much of it is cached.
Daemon statistics: .fedmount/stats.json at the root of the mount.
"""

BY_ID_README = """\
This directory gives access to Arvados collections as subdirectories named by UUID
(zzzzz-4zz18-0123456789abcde) or portable data hash (0123456789abcdef0123456789abcdef+123),
of any cluster of the federation. It appears empty until you look a collection up
(for instance `ls {name}/<id>`); from then on the collection is listed here.
"""

BY_PDH_README = """\
This directory gives access to Arvados collections as subdirectories named by portable
data hash (0123456789abcdef0123456789abcdef+123), of any cluster of the federation. It
appears empty until you look a collection up; from then on the collection is listed here.
"""


def _earliest_signature_expiry(text: str) -> int | None:
    expiries = _SIGNATURE_EXPIRY_RE.findall(text)
    return min(int(e, 16) for e in expiries) if expiries else None


@dataclass(frozen=True, slots=True)
class KeptRecord:
    """What a mounted collection keeps of its API record. Only ``.arvados#collection``
    reads the record as it came (the parsed tree serves the files), so it is kept
    zlib-compressed (level 1): its manifest text, the bulk of it (25.4 MB -> 5.4 MB in
    0.15 s for 1,000,000 files), and apart from it the other fields, which may be large too
    (a description, properties), since a re-check may replace them alone."""

    uuid: str
    portable_data_hash: str
    modified_at: float | None
    cluster: str
    route: KeepRoute
    field_names: tuple[str, ...]  # of the API's answer, without manifest_text
    packed_fields: bytes  # zlib of those fields as JSON
    packed_manifest: bytes | None  # zlib of that manifest_text; None if the answer had none

    @classmethod
    def of(cls, record: CollectionSummaryLike, packed_manifest: bytes | None) -> KeptRecord:
        """`record` packed (CPU-heavy for a large record: run it in a worker thread)."""
        fields = {k: v for k, v in record.record.items() if k != "manifest_text"}
        return cls(
            record.uuid,
            record.portable_data_hash,
            record.modified_at,
            record.cluster,
            record.route,
            tuple(fields),
            zlib.compress(json.dumps(fields).encode(), 1),
            packed_manifest,
        )

    def summary_fields(self) -> list[str]:
        """What a re-check selects when the record changed but not its PDH: every field of
        this record but its manifest text (so ``.arvados#collection`` stays as fresh), less
        those the API adds anyway."""
        return sorted({"uuid", "portable_data_hash", *self.field_names} - _ALWAYS_SELECTED)

    def answer(self) -> dict[str, Any]:
        """The API's answer as it came (with the manifest text of the parsed generation)."""
        fields: dict[str, Any] = json.loads(zlib.decompress(self.packed_fields))
        if self.packed_manifest is not None:
            fields["manifest_text"] = zlib.decompress(self.packed_manifest).decode()
        return fields


def _load(record: CollectionRecordLike) -> tuple[KeptRecord, Manifest, int | None]:
    """Parse a record's manifest and pack the record (run in a worker thread)."""
    text = record.manifest_text
    manifest, expiry = parse_manifest(text), _earliest_signature_expiry(text)
    answered = record.record.get("manifest_text")
    packed = zlib.compress(answered.encode(), 1) if isinstance(answered, str) else None
    return KeptRecord.of(record, packed), manifest, expiry


def _segment_keys(file: File) -> list[tuple[str, int, int]]:
    return [(s.locator.key, s.block_offset, s.length) for s in file.segments()]


def _api_group(cid: CollectionId) -> str:
    """Whose stall an API call about `cid` waits on (`Calls`): a UUID's owning cluster; one
    group for every PDH, which may be on any cluster."""
    return cid.cluster or "pdh"


class Node:
    """Something with an inode number and attributes."""

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


class BytesHandle(Handle):
    """An open generated file: the bytes as they were when it was opened."""

    def __init__(self, data: bytes, keep_cache: bool, direct_io: bool):
        self._data = data
        self.keep_cache = keep_cache
        self.direct_io = direct_io

    async def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]


class GeneratedFile(Node):
    """A file whose bytes come from a function: READMEs, stats, collection records.

    `static` files (READMEs) never change and are cached by the kernel like PDH content;
    the others are regenerated at each open and read with direct I/O, so their size in
    `stat` is only an indication."""

    def __init__(self, tree: Tree, ino: int, content: Callable[[], bytes], *, static: bool,
                 mtime: Callable[[], float], entry_timeout: float = FOREVER):
        self.tree = tree
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
    """A directory with a fixed set of entries (the root, ``.fedmount``)."""

    def __init__(self, tree: Tree, ino: int, entries: dict[str, Node], hidden: dict[str, Node] | None = None):
        self.tree = tree
        self.ino = ino
        self.children = entries
        self.hidden = hidden or {}

    def attr(self) -> Attr:
        return Attr(self.ino, True, 0, self.tree.started, FOREVER, FOREVER)

    async def lookup(self, name: str) -> Node:
        node = self.children.get(name) or self.hidden.get(name)
        if node is None:
            raise FsError(errno.ENOENT, cache_for=self.tree.negative_ttl)
        return node

    async def entries(self) -> list[tuple[str, Node]]:
        return list(self.children.items())


class ByIdDir(DirNode):
    """``by_id/`` (or ``by_pdh/``): collections appear when looked up by UUID or PDH."""

    def __init__(self, tree: Tree, ino: int, name: str, pdh_only: bool):
        self.tree = tree
        self.ino = ino
        self.name = name
        self.pdh_only = pdh_only
        # By canonical id: every spelling of a PDH (hints, leading zeros) is one collection.
        self._collections: dict[str, Collection] = {}
        self._negative = NegativeCache(tree.negative_ttl, tree.clock)
        self._loading: dict[str, Call[Collection]] = {}
        text = (BY_PDH_README if pdh_only else BY_ID_README.format(name=name)).encode()
        self.readme = GeneratedFile(tree, tree.table.number(("readme", ino)), lambda: text, static=True,
                                    mtime=lambda: tree.started)
        tree.table.bind(self.readme.ino, self.readme)

    def attr(self) -> Attr:
        return Attr(self.ino, True, 0, self.tree.started, FOREVER, FOREVER)

    async def lookup(self, name: str) -> Node:
        tree = self.tree
        if name == "README":
            if not tree.ready:
                raise FsError(errno.ENOENT)  # not cached: crunch-run polls for it
            return self.readme
        try:
            cid = parse_collection_id(name)
        except IdError:
            cid = None
        if cid is None or (self.pdh_only and not cid.is_pdh):
            tree.stats.add("lookups_refused_locally")
            raise FsError(errno.ENOENT, cache_for=tree.negative_ttl)
        key = cid.text
        coll = self._collections.get(key)
        if coll is None:
            if key in self._negative:
                tree.stats.add("lookups_negative_cached")
                raise FsError(errno.ENOENT, cache_for=tree.negative_ttl)
            coll = await self._loaded(key, cid)
        try:
            await coll.fresh()
        except FsError as e:
            if e.errno == errno.ENOENT:  # a UUID collection that was deleted
                self._collections.pop(key, None)
                self._negative.add(key)
            raise
        return coll.root

    async def _loaded(self, key: str, cid: CollectionId) -> Collection:
        """Collection `key`, loaded by the background call this lookup starts or joins (so
        concurrent lookups of one id make one API call); ETIMEDOUT once that call is past its
        deadline (`Calls`): it goes on, and a later lookup gets its answer."""
        tree = self.tree
        call = self._loading.get(key)
        if call is None:
            call = self._loading[key] = tree.calls.start(_api_group(cid), f"loading collection {cid}",
                                                         lambda: self._load(key, cid))
        if await call.wait():
            return call.result()
        group, wait = _api_group(cid), tree.calls.wait
        why = f"within {wait:g}s" if call.waited_for else f"yet ({group} has requests pending past {wait:g}s)"
        message = f"collection {cid}: no answer from the API {why}; still asking, for the next lookup"
        if call.first_late_answer():
            tree.stats.add("api_calls_late", op="lookup", cluster=group)
            log.warning("%s", message)
        raise FsError(errno.ETIMEDOUT, message)

    async def _load(self, key: str, cid: CollectionId) -> Collection:
        try:
            record, manifest, expiry = await self.tree.fetch(cid)
            root_ino = self.tree.table.number((self.ino, key))
            coll = Collection(self.tree, cid, (self.ino, key), root_ino, record, manifest, expiry)
            self._collections[key] = coll
            return coll
        except FsError as e:
            if e.errno == errno.ENOENT:
                self._negative.add(key)
                e.cache_for = self.tree.negative_ttl
            raise
        finally:
            self._loading.pop(key, None)

    async def entries(self) -> list[tuple[str, Node]]:
        out: list[tuple[str, Node]] = [("README", self.readme)] if self.tree.ready else []
        out.extend((name, coll.root) for name, coll in self._collections.items())
        return out


class Collection:
    """One mounted collection: its record, parsed manifest, generation and refresh times."""

    def __init__(self, tree: Tree, cid: CollectionId, key: Hashable, root_ino: int,
                 record: KeptRecord, manifest: Manifest, expiry: int | None):
        self.tree = tree
        self.cid = cid
        self.key = key
        self.record = record
        self.manifest = manifest
        self.generation = 0
        self._recheck: Call[None] | None = None  # the re-check running in the background
        self._listings: dict[str, Listing] = {}  # by directory path, once the kernel looked into it
        self._set_times(expiry)
        self.root = CollectionDir(self, "", root_ino)
        tree.table.bind(root_ino, self.root)
        record_ino = tree.table.number((key, COLLECTION_RECORD_NAME))
        self.record_file = GeneratedFile(tree, record_ino, self._record_json, static=False,
                                         mtime=self.mtime, entry_timeout=self.timeout)
        tree.table.bind(record_ino, self.record_file)

    @property
    def immutable(self) -> bool:
        return self.cid.is_pdh

    @property
    def timeout(self) -> float:
        return FOREVER if self.immutable else self.tree.refresh_time

    def mtime(self) -> float:
        return self.record.modified_at or self.tree.started

    def describe(self) -> str:
        return f"collection {self.cid} (cluster {self.record.cluster})"

    def _record_json(self) -> bytes:
        return (json.dumps(self.record.answer(), indent=1, sort_keys=True) + "\n").encode()

    def _set_times(self, expiry: int | None) -> None:
        tree = self.tree
        self.checked_at = tree.clock()
        if expiry is None:
            self.signatures_refresh_at = math.inf
        else:
            now = tree.wall()
            self.signatures_refresh_at = now + max((expiry - now) / 2, MIN_SIGNATURE_REFRESH)

    def _due(self) -> bool:
        if self.tree.wall() >= self.signatures_refresh_at:
            return True
        return not self.immutable and self.tree.clock() - self.checked_at >= self.tree.refresh_time

    def signatures_due(self) -> bool:
        return self.tree.wall() >= self.signatures_refresh_at

    async def fresh(self, wait: bool = True) -> None:
        """Start a re-check of the record if one is due (UUID re-check or signature
        half-life); with `wait`, wait for it until its deadline (`Calls`). Past that, the
        current generation is served and the re-check goes on in the background: a stalled
        API costs the operations of one deadline, as a down one does. Raises FsError ENOENT
        if the re-check found a UUID collection deleted."""
        call = self._recheck
        if call is None:
            if not self._due():
                return
            what = f"re-check of {self.describe()}"
            call = self._recheck = self.tree.calls.start(_api_group(self.cid), what, self._refresh)
        if not wait:
            return
        if await call.wait():
            call.result()
        elif call.first_late_answer():
            self.tree.stats.add("api_calls_late", op="recheck", cluster=_api_group(self.cid))
            log.warning("%s: no answer from the API within %gs; serving the version we have while the "
                        "re-check goes on", self.describe(), self.tree.calls.wait)

    async def _refresh(self) -> None:
        try:
            await self._refresh_now()
        finally:
            self._recheck = None

    async def _refresh_now(self) -> None:
        tree = self.tree
        signatures_due = self.signatures_due()
        tree.stats.add("collection_refreshes")
        known = None if signatures_due else self.record  # parse again only if due or changed
        try:
            record, manifest, expiry = await tree.recheck(self.cid, known)
        except FsError as e:
            if e.errno == errno.ENOENT and not self.immutable:
                raise
            # Keep serving what we have (fetch logged why); try again a little later.
            self.checked_at = tree.clock()
            if signatures_due:
                self.signatures_refresh_at = tree.wall() + RETRY_AFTER_ERROR
            return
        changed = record.portable_data_hash != self.record.portable_data_hash
        if manifest is None:
            self.record = record
            self.checked_at = tree.clock()
            return
        if changed:
            log.info("%s changed: %s -> %s", self.describe(), self.record.portable_data_hash,
                     record.portable_data_hash)
        old, old_mtime = self.manifest, self.mtime()
        self.record, self.manifest = record, manifest
        self.generation += 1
        self._set_times(expiry)
        if changed:
            tree.on_change(self._renumber_changed(old, old_mtime))
        del old
        release()  # what no listing or open file still holds of the old generation

    def listing(self, directory_node: CollectionDir, directory: Directory) -> Listing:
        """The inode range of a directory's entries; numbered from `directory` the first time."""
        listing = self._listings.get(directory_node.path)
        if listing is None:
            listing = self._listings[directory_node.path] = Listing(self, directory_node, directory)
        return listing

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


def _subdir_names(directory: Directory) -> list[str]:
    """`directory`'s sub-directory names in `Directory.entries` order (they come first)."""
    return [name for name, _ in takewhile(lambda e: isinstance(e[1], Directory), directory.entries())]


class Listing:
    """One collection directory's entries numbered as one inode range (see `InodeTable`).

    Entry i of the range is entry i of `snapshot`, the manifest directory as it was when
    the kernel first looked into it: sub-directories first, then files by their index in
    the directory's packed arrays. Nothing is kept per entry: a number's node is made
    when asked for (`node_at`). A name that a later generation of a UUID collection added,
    or whose kind changed, gets a keyed single number and a bound node (`extra`), and so
    does a file whose content changed: its old number is `retire`d."""

    __slots__ = ("coll", "path", "ino", "snapshot", "subdirs", "subdir_index", "start", "extra", "retired")

    def __init__(self, coll: Collection, directory_node: CollectionDir, snapshot: Directory):
        self.coll = coll
        self.path = directory_node.path
        self.ino = directory_node.ino
        self.snapshot = snapshot
        self.subdirs = _subdir_names(snapshot)
        self.subdir_index = {name: i for i, name in enumerate(self.subdirs)}
        self.start = coll.tree.table.allocate(len(snapshot), self)
        self.extra: dict[tuple[str, bool], int] = {}  # current numbers outside the range
        self.retired: set[int] = set()  # numbers of file versions that are no longer current

    def child_path(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def _index(self, name: str, is_dir: bool) -> int | None:
        """Where `name` of that kind is in the snapshot, or None."""
        if is_dir:
            return self.subdir_index.get(name)
        entry = self.snapshot.get(name)
        return len(self.subdirs) + entry._index if isinstance(entry, File) else None

    def _make(self, name: str, entry: Directory | File | None, is_dir: bool, ino: int) -> Node:
        """A node for `ino`; `entry`, if given, is the name's entry in the current manifest."""
        path = self.child_path(name)
        if is_dir:
            return CollectionDir(self.coll, path, ino)
        return CollectionFile(self.coll, path, ino, entry if isinstance(entry, File) else None)

    def node(self, name: str, entry: Directory | File, generation: int) -> Node:
        """The node of entry `name` of the directory of that collection generation."""
        is_dir = isinstance(entry, Directory)
        # An older generation's entry (a readdir begun before a refresh): the node resolves its path.
        current = entry if generation == self.coll.generation else None
        ino = self.extra.get((name, is_dir))
        if ino is None:
            index = self._index(name, is_dir)
            if index is not None and self.start + index not in self.retired:
                return self._make(name, current, is_dir, self.start + index)
            table = self.coll.tree.table
            key = (self.coll.key, self.child_path(name), is_dir, self.coll.generation)
            ino = self.extra[(name, is_dir)] = table.number(key)
            table.bind(ino, self._make(name, None, is_dir, ino))
        return self._make(name, current, is_dir, ino)

    def retire(self, name: str, ino: int, size: int, mtime: float) -> None:
        """File `name`'s number `ino` no longer names its current content: from now on it
        is a `SupersededFile` (the version the handles opened on it read), and the name
        gets a new number when it is next asked for."""
        self.retired.add(ino)
        if self.extra.get((name, False)) == ino:
            del self.extra[(name, False)]
        self.coll.tree.table.bind(ino, SupersededFile(self.coll, self.child_path(name), ino, size, mtime))

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


class ListingView:
    """A collection directory's entries as of `opendir`, made into nodes one at a time."""

    def __init__(self, listing: Listing, directory: Directory):
        self.listing = listing
        self.directory = directory
        self.generation = listing.coll.generation
        self.subdirs = listing.subdirs if directory is listing.snapshot else _subdir_names(directory)

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
        if self.path == "":
            if name == COLLECTION_RECORD_NAME:
                return self.coll.record_file
            if name == STATS_DIR_NAME and self.coll.tree.root is self:
                return self.coll.tree.stats_dir
        raise FsError(errno.ENOENT, cache_for=self.coll.timeout)

    async def entries(self) -> Entries:
        await self.coll.fresh()
        directory = self._dir()
        return ListingView(self.coll.listing(self, directory), directory)

    def xattr_names(self) -> list[str]:
        return self.coll.xattr_names()

    def xattr(self, name: str) -> bytes:
        return self.coll.xattr(name)


class CollectionFile(Node):
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
        current = self.coll.tree.node(self.ino)
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
            cached = self.coll.tree.cached_bytes
            total = 0
            for s in self.file.segments():
                have = cached(s.locator.key)
                total += s.length if have >= s.locator.size else s.length * have // max(s.locator.size, 1)
            return str(total).encode()
        return self.coll.xattr(name)


class SupersededFile(Node):
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
        self._reader = self.coll.tree.reader.open(self._file, self.coll.record.route)

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
                self._reader = coll.tree.reader.open(new, coll.record.route)
        try:
            return await self._reader.read(offset, size)
        except BlockError as e:
            coll.tree.stats.add("read_errors", cluster=coll.record.route.cluster)
            failure = block_failure(e, f"{coll.describe()}: reading {self.node.path}")
            log.error("%s", failure)
            raise failure from e

    def close(self) -> None:
        self._reader.close()


class Tree:
    """The whole mount: inode table, root, and the operations the adapter forwards."""

    def __init__(
        self,
        federation: FederationLike,
        reader: BlockReaderLike,
        *,
        stats: Stats,
        layout: Layout | None = None,
        refresh_time: float = 15.0,
        api_wait: float = DEFAULT_API_WAIT,
        negative_ttl: float | None = None,
        cached_bytes: Callable[[str], int] = lambda key: 0,
        cache_usage: Callable[[], tuple[int, int]] = lambda: (0, 0),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.federation = federation
        self.reader = reader
        self.stats = stats
        self.layout = layout or Layout()
        self.refresh_time = refresh_time
        self.negative_ttl = refresh_time if negative_ttl is None else negative_ttl
        self.cached_bytes = cached_bytes
        self.cache_usage = cache_usage
        self.clock = clock
        self.wall = wall
        self.started = wall()
        self.ready = False
        self._starting = False  # while `start` loads --collection: its failure is printed, not logged
        self.on_change: Callable[[Invalidation], None] = lambda invalidation: None  # set by the adapter
        self.calls = Calls(api_wait, quiet=(FsError,))  # its nursery is set by whoever serves the tree
        self.table: InodeTable[Node] = InodeTable()
        stats_ino = self.table.number(("stats", STATS_FILE_NAME))
        stats_file = GeneratedFile(self, stats_ino, self._stats_json, static=False, mtime=self.wall)
        self.table.bind(stats_ino, stats_file)
        self.stats_dir = StaticDir(self, self.table.number(("stats",)), {STATS_FILE_NAME: stats_file})
        self.table.bind(self.stats_dir.ino, self.stats_dir)
        # With --collection the root is that collection once `start` has loaded it.
        placeholder = self.layout.collection is not None
        self.root: DirNode = StaticDir(self, ROOT_INODE, {}) if placeholder else self._default_root()
        self.table.bind(ROOT_INODE, self.root)

    def _default_root(self) -> DirNode:
        layout = self.layout
        entries: dict[str, Node] = {}
        if layout.by_id or layout.by_pdh:
            for names, pdh_only in ((layout.by_id, False), (layout.by_pdh, True)):
                for name in names:
                    entries[name] = self._by_id_dir(name, pdh_only)
        else:
            readme = ROOT_README.encode()
            ino = self.table.number(("readme", ROOT_INODE))
            entries["README"] = GeneratedFile(self, ino, lambda: readme, static=True,
                                              mtime=lambda: self.started)
            self.table.bind(ino, entries["README"])
            entries["by_id"] = self._by_id_dir("by_id", False)
        return StaticDir(self, ROOT_INODE, entries, {STATS_DIR_NAME: self.stats_dir})

    def _by_id_dir(self, name: str, pdh_only: bool) -> ByIdDir:
        node = ByIdDir(self, self.table.number(("dir", name)), name, pdh_only)
        self.table.bind(node.ino, node)
        return node

    async def start(self) -> None:
        """Load what must exist before mounting: the ``--collection`` collection.

        Raises `FsError` with a one-line message if it cannot be loaded."""
        if self.layout.collection is None:
            return
        try:
            cid = parse_collection_id(self.layout.collection)
        except ValueError as e:
            raise FsError(errno.EINVAL, str(e)) from None
        self._starting = True
        try:
            record, manifest, expiry = await self.fetch(cid)
        finally:
            self._starting = False
        coll = Collection(self, cid, ("root",), ROOT_INODE, record, manifest, expiry)
        assert isinstance(coll.root, CollectionDir)
        self.root = coll.root

    async def fetch(self, cid: CollectionId) -> tuple[KeptRecord, Manifest, int | None]:
        """The record and parsed manifest of `cid`, or FsError (logged in one line)."""
        record, manifest, expiry = await self.recheck(cid, None)
        assert manifest is not None
        return record, manifest, expiry

    async def recheck(
        self, cid: CollectionId, known: KeptRecord | None
    ) -> tuple[KeptRecord, Manifest | None, int | None]:
        """As `fetch`, but given `known` (the current record of a UUID collection) it first
        asks only for `FRESHNESS_FIELDS`. If the portable data hash and modification time are
        `known`'s, it gives (`known`, None, None); if only the time changed, the record's
        other kept fields, still without the manifest text (with `known`'s manifest text,
        None, None); only a new portable data hash fetches and parses the whole record.

        The answer, its JSON text and the parse's temporaries are garbage once this returns
        (or raises), so the C heap's free memory is given back to the system then."""
        try:
            return await self._fetch(cid, known)
        finally:
            release()

    async def _fetch(
        self, cid: CollectionId, known: KeptRecord | None
    ) -> tuple[KeptRecord, Manifest | None, int | None]:
        if known is not None:
            summary = await self._ask(cid, self.federation.get_summary(cid, FRESHNESS_FIELDS))
            if summary.portable_data_hash == known.portable_data_hash:
                if summary.modified_at == known.modified_at:
                    return known, None, None
                # Only the record's other fields changed: ask for them, still without the manifest.
                summary = await self._ask(cid, self.federation.get_summary(cid, known.summary_fields()))
                if summary.portable_data_hash == known.portable_data_hash:
                    kept = await trio.to_thread.run_sync(KeptRecord.of, summary, known.packed_manifest)
                    return kept, None, None
        record = await self._ask(cid, self.federation.get_collection(cid))
        try:
            kept, manifest, expiry = await trio.to_thread.run_sync(_load, record)
        except ManifestError as e:
            message = f"collection {cid} (cluster {record.cluster}): {e}"
            self.stats.add("manifest_errors", cluster=record.cluster)
            if not self._starting:
                log.error("%s", message)
            raise FsError(errno.EIO, message) from None
        self.stats.add("collections_loaded", cluster=record.cluster)
        return kept, manifest, expiry

    async def _ask(self, cid: CollectionId, answer: Awaitable[T]) -> T:
        """The federation's `answer` about `cid`; its `ApiError` as FsError, logged in one line."""
        try:
            return await answer
        except ApiError as e:
            code = api_errno(e)
            message = f"collection {cid} (cluster {e.cluster or '?'}): {e.message}"
            if code != errno.ENOENT:
                self.stats.add("api_errors", cluster=e.cluster)
            if not self._starting:
                log.log(logging.INFO if code == errno.ENOENT else logging.ERROR, "%s", message)
            raise FsError(code, message) from None

    def _stats_json(self) -> bytes:
        return (json.dumps(self.stats.snapshot(), indent=1, sort_keys=True) + "\n").encode()

    # -- operations the adapter forwards -------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def dir(self, ino: int) -> DirNode:
        node = self.node(ino)
        if not isinstance(node, DirNode):
            raise FsError(errno.ENOTDIR)
        return node

    async def lookup(self, parent: int, name: str) -> Node:
        return await self.dir(parent).lookup(name)

    async def getattr(self, ino: int) -> Attr:
        await self.node(ino).fresh()
        return self.node(ino).attr()  # that refresh may have retired the number (SupersededFile)

    async def listdir(self, ino: int) -> Entries:
        return await self.dir(ino).entries()

    async def open(self, ino: int) -> Handle:
        node = self.node(ino)
        if isinstance(node, DirNode):
            raise FsError(errno.EISDIR)
        assert isinstance(node, (GeneratedFile, CollectionFile, SupersededFile))
        return await node.open()

    def listxattr(self, ino: int) -> list[str]:
        return self.node(ino).xattr_names()

    def getxattr(self, ino: int, name: str) -> bytes:
        return self.node(ino).xattr(name)

    def statfs(self) -> dict[str, int]:
        capacity, used = self.cache_usage()
        blocks = capacity // BLOCK_SIZE
        free = max(capacity - used, 0) // BLOCK_SIZE
        return {
            "f_bsize": BLOCK_SIZE, "f_frsize": BLOCK_SIZE, "f_blocks": blocks, "f_bfree": free,
            "f_bavail": free, "f_files": len(self.table) + FREE_INODES, "f_ffree": FREE_INODES,
            "f_favail": FREE_INODES, "f_namemax": 255,
        }  # fmt: skip
