"""Putting ``--mount-tmp`` directories at the root of a mount, with what they need to save.

`attach_scratch` makes one `ScratchStore` per name, all sharing one `Quota` (``--mount-tmp-size``,
by default 95% of what the backing directory's filesystem has free when the mount starts)
and one `Uploader`, whose `KeepWriter` is made at the first save: the home cluster's keep
services are asked for only then, so a mount whose scratch directories are never saved
costs no API call more. Blocks go to the home cluster with the home token, in
``defaultCollectionReplication`` copies (the discovery document's, 2 if absent, as the SDK
does) and the storage classes of ``--storage-classes``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedmount.arvados.routes import KeepRoute
from fedmount.blocks.upload import KeepWriter, PutTransport, SourceDir, Uploader
from fedmount.stats import Stats

from .errors import FsError
from .nodes import StaticDir
from .scratch import Quota, ScratchStore, default_quota
from .tree import Tree


class HomeLike(Protocol):
    default_replication: int

    async def home_route(self) -> KeepRoute: ...


@dataclass
class ScratchOptions:
    names: list[str] = field(default_factory=list)  # --mount-tmp
    backing_dir: str | None = None  # --mount-tmp-dir; None: the system's temporary directory
    size: int = 0  # --mount-tmp-size; 0: default_quota of the backing directory
    storage_classes: Sequence[str] = ()  # --storage-classes


class _HomeUploader:
    """An `Uploader` to the home cluster, made at the first upload."""

    def __init__(self, home: HomeLike, transport: PutTransport, classes: Sequence[str], stats: Stats):
        self._home = home
        self._transport = transport
        self._classes = list(classes)
        self._stats = stats
        self._uploader: Uploader | None = None

    async def upload(self, root: SourceDir) -> str:
        if self._uploader is None:
            route, copies = await self._home.home_route(), self._home.default_replication
            writer = KeepWriter(route, self._transport, copies=copies, classes=self._classes,
                                stats=self._stats)
            self._uploader = Uploader(writer)
        return await self._uploader.upload(root)


def attach_scratch(tree: Tree, home: HomeLike, opts: ScratchOptions, *, transport: PutTransport,
                   stats: Stats) -> list[ScratchStore]:
    """Add one scratch directory per name to the root of `tree` (a directory of directories)."""
    if not opts.names:
        return []
    backing = opts.backing_dir or tempfile.gettempdir()
    if not os.path.isdir(backing) or not os.access(backing, os.W_OK):
        raise FsError(errno.EACCES, f"--mount-tmp-dir {backing}: not a directory this user can write")
    root = tree.root
    if not isinstance(root, StaticDir):
        raise FsError(errno.EINVAL, "--mount-tmp needs a root of directories (not --collection or a mode)")
    quota = Quota(opts.size or default_quota(backing))
    uploader = _HomeUploader(home, transport, opts.storage_classes, stats)
    stores = []
    for name in opts.names:
        store = ScratchStore(name, backing_dir=backing, quota=quota, allocate=tree.context.table.allocate,
                             upload=uploader.upload, storage_classes=opts.storage_classes, stats=stats)
        root.children[name] = store.root
        stores.append(store)
    return stores
