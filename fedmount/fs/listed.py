"""Directories whose entries come from API listings, and collections found in them.

A `ListedDir` (a project, ``shared/``, a tag) asks its listing of the API in the
background (`fedmount.fs.calls`) the first time it is read and again when touched after
``refresh_time``; an operation waits for a listing until its deadline, and past it is
answered from the listing the directory has (or ETIMEDOUT if it has none yet, and the
call goes on for the next operation). A listing that fails keeps the previous one, logs
one line naming the directory and the cluster, and is asked again after ``refresh_time``;
with no previous listing the failure is the operation's answer (EIO for a cluster that is
down: only the directories of that cluster are affected), and the next operation asks again.

Entries are nodes kept by object uuid for the life of the directory (`ListedDir.known`),
each with a number of its own: a re-listing that renames an object keeps its number under
the new name, and a collection already loaded stays loaded. Memory (issue 17): a listing of
a million collections keeps, per entry, its name, a `ListedCollectionDir` with its uuid,
number and modification time, a slot in two dicts (by name, by uuid) and one in the list
of its page's numbers (`PageNumbers`), not its list record; nothing else (no key tuple, no
entry in the inode table's dict), and the records of a listing are decoded and dropped a
page at a time (`fedmount.api.listing.ProjectSource.contents`).

A `ListedCollectionDir` is a collection named in a listing: its attributes come from the
list record (no manifest is fetched to list a project) and it loads its collection, as
``by_id/`` does, when someone looks inside; from then on it is that collection's root.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fedmount.api.federation import parse_timestamp
from fedmount.arvados.errors import ApiError
from fedmount.arvados.ids import CollectionId, parse_collection_id
from fedmount.memory import release

from .calls import Call, answer_by_deadline
from .collection import Collection
from .context import MountContext
from .errors import FsError, api_failure
from .inodes import InodeTable
from .loader import CollectionLoader, api_group
from .nodes import Attr, DirNode, Entries, Node

log = logging.getLogger("fedmount.fs")
N = TypeVar("N", bound=Node)
RELEASE_AFTER = 1000  # entries: a listing of more than one page gives the C heap's free pages back


def record_mtime(record: dict[str, Any], default: float) -> float:
    return parse_timestamp(record.get("modified_at")) or default


async def asked(subject: str, answer: Awaitable[Any], context: MountContext) -> Any:
    """The API's `answer` about `subject`; its `ApiError` as FsError, logged in one line."""
    try:
        return await answer
    except ApiError as e:
        raise api_failure(e, subject, context.stats) from None


class ListedDir(DirNode):
    """A directory listed by the API (see the module docstring). Subclasses say what
    `_list` asks and how its items become named nodes; `hidden` entries answer a lookup
    without being listed."""

    def __init__(
        self,
        context: MountContext,
        ino: int,
        subject: str,
        cluster: str,
        mtime: float,
        hidden: dict[str, Node] | None = None,
    ):
        self.context = context
        self.ino = ino
        self.subject = subject  # names the directory in messages: "project zzzzz-j7d0g-..."
        self.cluster = cluster  # whose API lists it
        self.mtime = mtime
        self.hidden = dict(hidden or {})
        self._names: dict[str, Node] | None = None  # as of the last listing
        self.known: dict[str, Node] = {}  # every entry's node ever listed or found, by object uuid
        self._listed_at = -math.inf
        self._call: Call[dict[str, Node]] | None = None

    async def _list(self) -> dict[str, Node]:
        raise NotImplementedError

    def attr(self) -> Attr:
        timeout = self.context.policy.refresh_time
        return Attr(self.ino, True, 0, self.mtime, timeout, timeout)

    async def listing(self) -> dict[str, Node]:
        """The entries, listed again first if due (waiting for that until its deadline)."""
        context = self.context
        due = self._names is None or context.clock() - self._listed_at >= context.policy.refresh_time
        if self._call is None and due:  # never listed (or failed to): asked again each time
            self._call = context.calls.start(self.cluster, f"listing {self.subject}", self._relist)
        call = self._call
        if call is None:
            assert self._names is not None
            return self._names
        if self._names is None:
            return await answer_by_deadline(
                call, context.calls, self.cluster, self.subject, context.stats, "list"
            )
        if await call.wait():
            return call.result()
        return self._names

    async def _relist(self) -> dict[str, Node]:
        try:
            names = await self._list()
        except FsError:
            if self._names is None:
                raise
            return self._names  # keep serving the last listing (the failure was logged)
        finally:
            self._listed_at = self.context.clock()
            self._call = None
        self._names = names
        if len(names) >= RELEASE_AFTER:
            release()  # the free pages the listing's decoded pages left in the C heap
        return names

    async def lookup(self, name: str) -> Node:
        node = self.hidden.get(name)
        if node is None:
            node = (await self.listing()).get(name)
        if node is None:
            raise FsError(errno.ENOENT, cache_for=self.context.policy.refresh_time)
        return node

    async def entries(self) -> Entries:
        return list((await self.listing()).items())


class PageNumbers:
    """The numbers of the new collections of one page of a listing: one range of the inode
    table (`InodeTable.allocate`, as long as the page), taken at the first of them, whose
    owner this is. A listed collection costs the table a slot of this list, not a dict entry."""

    __slots__ = ("table", "size", "start", "nodes")

    def __init__(self, table: InodeTable[Node], size: int):
        self.table = table
        self.size = size  # at most this many nodes are added
        self.start = 0
        self.nodes: list[Node] = []

    def add(self, make: Callable[[int], N]) -> N:
        """A node made with the next number of the range."""
        if not self.nodes:
            self.start = self.table.allocate(self.size, self)
        node = make(self.start + len(self.nodes))
        self.nodes.append(node)
        return node

    def node_at(self, ino: int) -> Node | None:
        index = ino - self.start
        return self.nodes[index] if index < len(self.nodes) else None


class Lister(Protocol):
    """Whoever lists collections (`fedmount.fs.projects.ProjectTree`): what they load with."""

    context: MountContext
    loader: CollectionLoader


class ListedCollectionDir(DirNode):
    """A collection named in a listing (see the module docstring). Of its list record it
    keeps what its attributes need, its modification time: a listing of a million
    collections keeps a million of these, not a million records, and each holds one
    reference to its `Lister` rather than two (six slots: 80 bytes, not 96)."""

    __slots__ = ("lister", "ino", "uuid", "mtime", "collection", "_call")

    def __init__(self, lister: Lister, ino: int, record: dict[str, Any]):
        self.lister = lister
        self.ino = ino
        self.uuid = parse_collection_id(str(record["uuid"])).text  # the listing's key holds it anyway
        self.mtime = record_mtime(record, lister.context.started)
        self.collection: Collection | None = None
        self._call: Call[Collection] | None = None

    @property
    def context(self) -> MountContext:
        return self.lister.context

    @property
    def cid(self) -> CollectionId:
        return CollectionId(self.uuid)

    def relisted(self, record: dict[str, Any]) -> None:
        """Its directory listed it again, with this record (its attributes until it is loaded)."""
        self.mtime = record_mtime(record, self.context.started)

    def attr(self) -> Attr:
        if self.collection is not None:
            return self.collection.root.attr()
        timeout = self.context.policy.refresh_time
        return Attr(self.ino, True, 0, self.mtime, timeout, timeout)

    async def fresh(self) -> None:
        if self.collection is not None:
            await self.collection.fresh()

    async def _loaded(self) -> Collection:
        if self.collection is not None:
            await self.collection.fresh()
            return self.collection
        group = api_group(self.cid)
        if self._call is None:
            self._call = self.context.calls.start(group, f"loading collection {self.cid}", self._load)
        return await answer_by_deadline(
            self._call, self.context.calls, group, f"collection {self.cid}", self.context.stats, "lookup"
        )

    async def _load(self) -> Collection:
        try:
            record, manifest = await self.lister.loader.load(self.cid)
        finally:
            self._call = None
        self.collection = Collection(
            self.context, self.lister.loader, self.cid, (self.ino, "collection"), self.ino, record, manifest
        )
        return self.collection

    async def lookup(self, name: str) -> Node:
        return await (await self._loaded()).root.lookup(name)

    async def entries(self) -> Entries:
        return await (await self._loaded()).root.entries()

    def xattr_names(self) -> list[str]:
        return self.collection.root.xattr_names() if self.collection is not None else []

    def xattr(self, name: str) -> bytes:
        if self.collection is None:
            raise FsError(errno.ENODATA)
        return self.collection.root.xattr(name)
