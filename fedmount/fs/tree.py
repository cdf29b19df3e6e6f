"""The filesystem as a plain async model: the operations the pyfuse3 adapter forwards.

`fs/fuse.py` is a thin shell over `Tree`; unit tests drive `Tree` directly with small
fakes of the federation and the block reader. Each job has its module:

- `nodes.py`: generic nodes (`Node`, `DirNode`, `FileNode`, `Handle`, `GeneratedFile`,
  `StaticDir`) and their attributes;
- `context.py`: the `MountContext` the nodes share (clocks, stats, inode table, refresh
  policy, change sink) and the Protocols the fs needs of the layers below;
- `layout.py`: what the root holds (by-id directories, READMEs, ``.fedmount``);
- `collection.py`: a mounted collection's lifecycle (re-checks, signatures, generations,
  the invalidation diff) and its nodes;
- `listing.py`: inode numbering of collection listings, nothing kept per entry;
- `loader.py`: loading and re-checking records, failures as errnos;
- `inodes.py`, `calls.py`, `errors.py`: the inode table, background API calls with
  deadlines, the errno mapping.

Inodes: nothing is kept per collection entry, so a mount can list millions of them (see
`InodeTable`); a number is turned back into a node on demand and the node objects the
adapter gets are short-lived.

Errors: everything that fails raises `FsError(errno)`: unknown ids ENOENT, expired or
wrong tokens EACCES, unreachable clusters, block errors, malformed manifests and records
whose manifest does not hash to the PDH they claim EIO, a collection still loading past
its deadline ETIMEDOUT. The failure is logged in one line naming the collection and the
cluster; nothing else in the mount is affected.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

from fedmount.arvados.ids import parse_collection_id
from fedmount.stats import Stats

from .calls import DEFAULT_API_WAIT, Calls
from .collection import Collection
from .context import BlockReaderLike, FederationLike, Invalidation, MountContext, RefreshPolicy
from .errors import FsError
from .inodes import ROOT_INODE
from .layout import STATS_DIR_NAME, Layout, default_root, stats_dir
from .loader import CollectionLoader
from .nodes import Attr, DirNode, Entries, FileNode, Handle, Node, StaticDir
from .projects import ProjectSourceLike, ProjectTree
from .rechecks import Rechecks, SummariesLike

__all__ = ["Layout", "Tree"]

BLOCK_SIZE = 4096  # statfs unit
# statfs: inodes are numbered on demand without a limit, so there are always this many free
# (df -i shows the mount nearly empty; 0 free would look full to monitoring). Kept below
# 2**32 with the used ones, so that 32-bit statfs callers get no EOVERFLOW.
FREE_INODES = 1 << 30


class Tree:
    """The whole mount: its context, root, and the operations the adapter forwards."""

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
        projects: ProjectSourceLike | None = None,
        summaries: SummariesLike | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.federation = federation
        self.layout = layout or Layout()
        self.cache_usage = cache_usage  # (capacity, used) bytes of the block cache, for statfs
        policy = RefreshPolicy(refresh_time, refresh_time if negative_ttl is None else negative_ttl)
        calls = Calls(api_wait, quiet=(FsError,))  # its nursery is set by whoever serves the tree
        self.context = MountContext(stats, reader, calls, policy, cached_bytes, clock=clock, wall=wall)
        self.calls = calls
        rechecks = None if summaries is None else Rechecks(summaries, clock, refresh_time)
        self.loader = CollectionLoader(federation, stats, rechecks)
        self._hidden: dict[str, Node] = {STATS_DIR_NAME: stats_dir(self.context)}
        self.projects: ProjectTree | None = None
        if self.layout.lists_projects:
            if projects is None:
                raise ValueError("a layout with projects needs a project source")
            self.projects = ProjectTree(self.context, self.loader, projects)
        # With --collection or --project the root is that once `start` has loaded it.
        if self.layout.collection is not None or self.layout.mode == "project":
            self.root: DirNode = StaticDir(ROOT_INODE, {}, mtime=self.context.started,
                                           negative_ttl=policy.negative_ttl)
        else:
            self.root = default_root(self.context, self.loader, self.layout, self._hidden, self.projects)
        self.context.table.bind(ROOT_INODE, self.root)

    @property
    def ready(self) -> bool:
        """Whether the mount answers (set by the daemon once the kernel serves it)."""
        return self.context.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.context.ready = value

    @property
    def on_change(self) -> Callable[[Invalidation], None]:
        """Where a UUID collection that changed reports what the kernel must forget."""
        return self.context.on_change

    @on_change.setter
    def on_change(self, sink: Callable[[Invalidation], None]) -> None:
        self.context.on_change = sink

    async def start(self) -> None:
        """Load what must exist before mounting: the ``--collection`` collection or the
        ``--project`` project.

        Raises `FsError` with a one-line message if it cannot be loaded."""
        if self.layout.mode == "project":
            assert self.projects is not None and self.layout.project is not None
            record = await self.projects.record(self.layout.project)
            self.root = self.projects.project(ROOT_INODE, record, record["uuid"][:5], hidden=self._hidden)
            return
        if self.layout.collection is None:
            return
        try:
            cid = parse_collection_id(self.layout.collection)
        except ValueError as e:
            raise FsError(errno.EINVAL, str(e)) from None
        # Its failure is printed by the command, not logged.
        record, manifest = await self.loader.load(cid, quiet=True)
        coll = Collection(self.context, self.loader, cid, ("root",), ROOT_INODE, record, manifest,
                          hidden=self._hidden)
        self.root = coll.root

    # -- operations the adapter forwards -------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.context.table.get(ino)
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
        assert isinstance(node, FileNode)
        return await node.open()

    def listxattr(self, ino: int) -> list[str]:
        return self.node(ino).xattr_names()

    def getxattr(self, ino: int, name: str) -> bytes:
        return self.node(ino).xattr(name)

    def statfs(self) -> dict[str, int]:
        capacity, used = self.cache_usage()
        blocks = capacity // BLOCK_SIZE
        free = max(capacity - used, 0) // BLOCK_SIZE
        files = len(self.context.table) + FREE_INODES
        return {
            "f_bsize": BLOCK_SIZE, "f_frsize": BLOCK_SIZE, "f_blocks": blocks, "f_bfree": free,
            "f_bavail": free, "f_files": files, "f_ffree": FREE_INODES,
            "f_favail": FREE_INODES, "f_namemax": 255,
        }  # fmt: skip
