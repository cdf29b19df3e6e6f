"""The project tree: home/, shared/, projects and filter groups by name, on every cluster.

As arv-mount serves it (``services/fuse/arvados_fuse/fusedir.py``), and the federation's:

- ``home/`` is what the user owns on the home cluster (``groups.contents`` of the user);
  ``shared/`` what others share with them there (``groups.shared``): each owner a
  directory (users named "First Last", groups by name), and each shared project whose
  owner the user cannot see at the top. ``clusters/<id>/home`` and ``clusters/<id>/shared``
  are the same for every cluster of the federation, asked of that cluster with the token
  salted for it (arv-mount lists the home cluster only).
- A project or filter group (`ProjectDir`) lists its subprojects and filter groups, then
  its collections, by name (`fedmount.fs.names`: arv-mount's substitutions, the owning
  cluster's ``ForwardSlashNameSubstitution``, first one wins a name); its hidden
  ``.arvados#project`` is its record as JSON. Its contents are asked of the cluster that
  owns it, so a remote project lists as a local one does.
- A name looked up in a project never listed is asked for alone (`ProjectSource.find`), of
  the project's own cluster: a remote project answers too (arv-mount asks its home with an
  ``owner_uuid`` filter and finds nothing).
- A filter group selects objects from anywhere, possibly itself: a filter group inside
  itself (the same uuid above it in the path) lists nothing, so ``find`` ends.
- ``by_id/<project or filter group uuid>`` of any cluster is that project (`ProjectTree.by_id`).

Listing a project never fetches a manifest (`ListedCollectionDir`); listings refresh when
touched after ``refresh_time`` (`ListedDir`). Trashed objects and old versions are not
listed (the API leaves them out; old versions are dropped by `ProjectSource.contents`).
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fedmount.api.listing import ClusterConfig, Take, cluster_of

from .calls import JoinedCalls, answer_by_deadline
from .context import MountContext
from .errors import FsError
from .listed import ListedCollectionDir, ListedDir, PageNumbers, asked, record_mtime
from .loader import CollectionLoader
from .names import candidates, entry_name
from .nodes import GeneratedFile, Node, StaticDir

PROJECT_RECORD_NAME = ".arvados#project"
GROUP_UUID_RE = re.compile(r"^[a-z0-9]{5}-j7d0g-[a-z0-9]{15}$")
USER_UUID_RE = re.compile(r"^[a-z0-9]{5}-tpzed-[a-z0-9]{15}$")
COLLECTION_UUID_RE = re.compile(r"^[a-z0-9]{5}-4zz18-[a-z0-9]{15}$")


class ProjectSourceLike(Protocol):
    """What the project tree asks of the API (`fedmount.api.listing.ProjectSource`)."""

    @property
    def home_cluster(self) -> str: ...
    @property
    def clusters(self) -> list[str]: ...
    @property
    def user(self) -> dict[str, Any]: ...

    async def config(self, cluster: str) -> ClusterConfig: ...
    async def get(self, uuid: str) -> dict[str, Any]: ...
    async def contents(self, owner: str, take: Take, cluster: str | None = None) -> None: ...
    async def find(
        self, owner: str, names: Sequence[str], cluster: str | None = None
    ) -> list[dict[str, Any]]: ...
    async def shared(self, cluster: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...
    async def tags(self, cluster: str) -> list[str]: ...
    async def tagged(self, cluster: str, tag: str) -> list[str]: ...


def owner_name(record: dict[str, Any]) -> str | None:
    """How ``shared/`` names an owner: a group by its name, a user "First Last"."""
    if record.get("name"):
        return str(record["name"])
    if "first_name" in record:
        return f"{record.get('first_name') or ''} {record.get('last_name') or ''}"
    return None


class ProjectTree:
    """Makes the nodes of the project tree, each numbered by (parent, uuid)."""

    def __init__(self, context: MountContext, loader: CollectionLoader, source: ProjectSourceLike):
        self.context = context
        self.loader = loader
        self.source = source
        self._by_id: dict[tuple[int, str], ProjectDir] = {}
        self._loading: JoinedCalls[dict[str, Any]] = JoinedCalls(context.calls)

    def _number(self, parent: int, uuid: str) -> int:
        return self.context.table.number((parent, uuid))

    def node(
        self,
        known: dict[str, Node],
        record: dict[str, Any],
        cluster: str,
        ancestors: frozenset[str],
        numbers: PageNumbers,
    ) -> Node | None:
        """The node of an object listed in a directory (a project's, a user's) whose nodes by
        uuid are `known`: the one it had in an earlier listing, with the new record, if it had
        one. A new collection gets the next of its page's `numbers`, a new project a number of
        its own (`InodeTable.new`): `known` keys them."""
        uuid = str(record.get("uuid") or "")
        node = known.get(uuid)
        if isinstance(node, ListedCollectionDir | ProjectDir):
            node.relisted(record)
            return node
        if COLLECTION_UUID_RE.match(uuid):
            node = numbers.add(lambda ino: ListedCollectionDir(self, ino, record))
        elif GROUP_UUID_RE.match(uuid) or USER_UUID_RE.match(uuid):
            owner_cluster = cluster if USER_UUID_RE.match(uuid) else cluster_of(uuid)
            node = self.project(self.context.table.new(), record, owner_cluster, ancestors)
        else:
            return None
        known[uuid] = node
        return node

    def project(
        self,
        ino: int,
        record: dict[str, Any],
        cluster: str,
        ancestors: frozenset[str] = frozenset(),
        hidden: dict[str, Node] | None = None,
    ) -> ProjectDir:
        """A project, filter group or user's home numbered `ino`, listed from `cluster`."""
        node = ProjectDir(self, ino, record, cluster, ancestors, hidden)
        self.context.table.bind(ino, node)
        return node

    def home(self, ino: int, cluster: str, hidden: dict[str, Node] | None = None) -> ProjectDir:
        return self.project(ino, self.source.user, cluster, hidden=hidden)

    def shared(self, ino: int, cluster: str, hidden: dict[str, Node] | None = None) -> SharedDir:
        node = SharedDir(self, ino, cluster, hidden)
        self.context.table.bind(ino, node)
        return node

    def clusters_dir(self, ino: int) -> StaticDir:
        """``clusters/``: ``<id>/home`` and ``<id>/shared`` for every cluster of the federation."""
        table = self.context.table
        entries: dict[str, Node] = {}
        for cluster in self.source.clusters:
            home = self.home(table.number(("clusters", cluster, "home")), cluster)
            shared = self.shared(table.number(("clusters", cluster, "shared")), cluster)
            both: dict[str, Node] = {"home": home, "shared": shared}
            entries[cluster] = self._static(table.number(("clusters", cluster)), both)
        return self._static(ino, entries)

    def _static(self, ino: int, entries: dict[str, Node]) -> StaticDir:
        context = self.context
        node = StaticDir(ino, entries, mtime=context.started, negative_ttl=context.policy.negative_ttl)
        self.context.table.bind(ino, node)
        return node

    async def record(self, uuid: str) -> dict[str, Any]:
        """The record of project or filter group `uuid` (EINVAL for anything else)."""
        if not GROUP_UUID_RE.match(uuid):
            raise FsError(errno.EINVAL, f"{uuid!r} is not a project or filter group uuid")
        return await asked(f"project {uuid}", self.source.get(uuid), self.context)

    async def by_id(self, parent: int, uuid: str) -> ProjectDir:
        """Project or filter group `uuid` of any cluster, as ``by_id/<uuid>``."""
        node = self._by_id.get((parent, uuid))
        if node is None:
            cluster = cluster_of(uuid)
            what = f"loading project {uuid}"
            call = self._loading.start((parent, uuid), cluster, what, lambda: self.record(uuid))
            record = await answer_by_deadline(call, self.context.calls, cluster, f"project {uuid}",
                                              self.context.stats, "lookup")  # fmt: skip
            node = self._by_id.get((parent, uuid))  # made by a concurrent lookup of the same call
            if node is None:
                node = self._by_id[(parent, uuid)] = self.project(self._number(parent, uuid), record, cluster)
        return node

    def looked_up_by_id(self, parent: int) -> list[tuple[str, Node]]:
        """The projects looked up under ``by_id/`` directory `parent`, by uuid."""
        return [(uuid, node) for (where, uuid), node in self._by_id.items() if where == parent]

    async def names(
        self,
        items: list[dict[str, Any]],
        known: dict[str, Node],
        cluster: str,
        ancestors: frozenset[str],
        name_of: Callable[[dict[str, Any]], object] = lambda item: item.get("name"),
        out: dict[str, Node] | None = None,
    ) -> dict[str, Node]:
        """`items` as named entries of the directory whose nodes are `known` (`node`), added to
        `out` (default: none yet): the first to take a name keeps it."""
        out = {} if out is None else out
        numbers = PageNumbers(self.context.table, len(items))
        for item in items:
            uuid = str(item.get("uuid") or "")
            config = await self.source.config(cluster_of(uuid) if uuid else cluster)
            name = entry_name(name_of(item), config.slash_substitution)
            if name is None or name in out:
                continue
            node = self.node(known, item, cluster, ancestors, numbers)
            if node is not None:
                out[name] = node
        return out


class ProjectDir(ListedDir):
    """A project, filter group or user's home (see the module docstring)."""

    def __init__(
        self,
        tree: ProjectTree,
        ino: int,
        record: dict[str, Any],
        cluster: str,
        ancestors: frozenset[str],
        hidden: dict[str, Node] | None = None,
    ):
        uuid = str(record["uuid"])
        kind = "user" if USER_UUID_RE.match(uuid) else "project"
        context = tree.context
        super().__init__(
            context, ino, f"{kind} {uuid}", cluster, record_mtime(record, context.started), hidden
        )
        self.tree = tree
        self.uuid = uuid
        self.record = record
        # Filter groups can contain themselves: inside itself one lists nothing, so walks end.
        self.contained_in_itself = record.get("group_class") == "filter" and uuid in ancestors
        self.ancestors = ancestors | {uuid}
        self._found: dict[str, Node] = {}  # names looked up before any listing
        self._finding: JoinedCalls[Node | None] = JoinedCalls(context.calls)
        data = lambda: (json.dumps(self.record, indent=1, sort_keys=True) + "\n").encode()  # noqa: E731
        self.record_file = GeneratedFile(
            context.table.number((ino, PROJECT_RECORD_NAME)),
            data,
            static=False,
            mtime=lambda: self.mtime,
            entry_timeout=context.policy.refresh_time,
        )
        context.table.bind(self.record_file.ino, self.record_file)
        self.hidden[PROJECT_RECORD_NAME] = self.record_file

    def relisted(self, record: dict[str, Any]) -> None:
        """Its parent listed it again, with this record."""
        self.record = record
        self.mtime = record_mtime(record, self.context.started)

    async def _list(self) -> dict[str, Node]:
        if self.contained_in_itself:
            return {}
        tree = self.tree
        out: dict[str, Node] = {}

        async def take(items: list[dict[str, Any]]) -> None:  # a page: its records die before the next
            await tree.names(items, self.known, self.cluster, self.ancestors, out=out)

        await asked(self.subject, tree.source.contents(self.uuid, take, self.cluster), self.context)
        return out

    async def lookup(self, name: str) -> Node:
        if name in self.hidden or self._names is not None or self.contained_in_itself:
            return await super().lookup(name)
        node = self._found.get(name)
        if node is None:
            call = self._finding.start(name, self.cluster, f"looking up {name!r} in {self.subject}",
                                       lambda: self._find(name))  # fmt: skip
            subject = f"{self.subject}: {name!r}"
            node = await answer_by_deadline(call, self.context.calls, self.cluster, subject,
                                            self.context.stats, "lookup")  # fmt: skip
        if node is None:
            raise FsError(errno.ENOENT, cache_for=self.context.policy.refresh_time)
        return node

    async def _find(self, name: str) -> Node | None:
        """`name` asked for alone, in a project never listed (arv-mount's rule: the object
        found must give back the name looked up; an exact name wins over a substitution)."""
        tree = self.tree
        substitution = (await tree.source.config(self.cluster)).slash_substitution
        wanted = candidates(name, substitution)
        items = await asked(self.subject, tree.source.find(self.uuid, wanted, self.cluster), self.context)
        items.sort(key=lambda item: item.get("name") != name)
        found = await tree.names(items[:1], self.known, self.cluster, self.ancestors)
        node = found.get(name)
        if node is not None:
            self._found[name] = node
        return node


class SharedDir(ListedDir):
    """``shared/`` of one cluster: the owners of what is shared with the user, and the
    shared projects whose owner the user cannot see."""

    def __init__(self, tree: ProjectTree, ino: int, cluster: str, hidden: dict[str, Node] | None = None):
        super().__init__(
            tree.context, ino, f"shared projects of cluster {cluster}", cluster, tree.context.started, hidden
        )
        self.tree = tree

    async def _list(self) -> dict[str, Node]:
        source = self.tree.source
        roots, owners = await asked(self.subject, source.shared(self.cluster), self.context)
        visible = {str(o.get("uuid")) for o in owners} | {str(r.get("uuid")) for r in roots}
        owners = sorted(owners, key=lambda o: str(o.get("uuid")))
        orphans = sorted(
            (r for r in roots if r.get("owner_uuid") not in visible), key=lambda r: str(r.get("uuid"))
        )
        return await self.tree.names(
            [*owners, *orphans], self.known, self.cluster, frozenset(), name_of=owner_name
        )
