"""What the root of the mount holds: the default layout, by-id directories, READMEs.

The default root holds ``README`` and ``by_id/``. A lookup of any collection UUID or PDH
under ``by_id/`` resolves it through the federation and from then on the collection is
listed there, under its canonical id: every spelling of a PDH (with hints, with leading
zeros in the size) is that one collection, loaded once. ``--mount-by-id DIR`` /
``--mount-by-pdh DIR`` build a root of such directories instead (``by_pdh`` refuses
UUIDs), as crunch-run uses them; ``--collection ID`` puts one collection at the root
(`Tree.start`). ``by_id/README`` exists only once the mount is ready (crunch-run polls for
it). The mount root has a hidden ``.fedmount/stats.json`` (the daemon's `Stats`); readdir
does not list it.

Negative answers: names that cannot be a collection id (`parse_collection_id`) are refused
without any API call. A collection id the API does not know is remembered for
``negative_ttl`` seconds in a `NegativeCache`, and `FsError.cache_for` tells the adapter
that the kernel may cache the negative entry for as long.

Loading a collection not yet mounted is an API call in the background (`fedmount.fs.calls`):
concurrent lookups of one id join one call, and past its deadline a lookup answers
ETIMEDOUT while the call goes on for the next lookup.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass, field

from fedmount.arvados.ids import CollectionId, IdError, parse_collection_id

from .calls import Call, answer_by_deadline
from .collection import Collection
from .context import MountContext
from .errors import FsError
from .inodes import ROOT_INODE, NegativeCache
from .loader import CollectionLoader, api_group
from .nodes import FOREVER, Attr, DirNode, GeneratedFile, Node, StaticDir
from .projects import GROUP_UUID_RE, ProjectTree
from .tags import TagsDir

log = logging.getLogger("fedmount.fs")

STATS_DIR_NAME = ".fedmount"
STATS_FILE_NAME = "stats.json"


@dataclass
class Layout:
    """What the root holds: one collection (``--collection``), one directory (``--home``,
    ``--shared``, ``--by-tag``, ``--project``), directories named by ``--mount-*``, the
    whole tree (``everything``: ``--all``, fedmount's default), or README and by_id."""

    collection: str | None = None
    by_id: list[str] = field(default_factory=list)
    by_pdh: list[str] = field(default_factory=list)
    home: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    by_tag: list[str] = field(default_factory=list)
    mode: str | None = None  # "home", "shared", "by_tag" or "project": that directory is the root
    project: str | None = None  # with mode "project"
    everything: bool = False
    filters: list[list[object]] = field(default_factory=list)  # --filters: of project, shared, tag listings

    @property
    def lists_projects(self) -> bool:
        return bool(self.everything or self.mode or self.home or self.shared or self.by_tag)

    def root_option(self) -> str:
        """The option whose root must load before mounting, as the user wrote it."""
        return f"--collection {self.collection}" if self.collection else f"--project {self.project}"


ROOT_README = """\
This is a fedmount: read-only access to Arvados collections of every cluster of a federation.

  by_id/<collection UUID or portable data hash>/   one collection, from any cluster
{projects}
by_id/ starts out empty: look a collection up by name (ls, cd, cat) and it appears.
Collections addressed by portable data hash never change and are cached by the kernel;
collections addressed by UUID are re-checked every few seconds.

Each collection directory has a hidden .arvados#collection file (its API record as JSON).
Extended attributes (getfattr -d FILE) under user.arvados.* give the collection's uuid,
portable data hash and cluster, a file's block locators and how much of it is cached.
Daemon statistics: .fedmount/stats.json at the root of the mount.
"""

PROJECTS_README = """\
  by_id/<project or filter group UUID>/            one project, from any cluster
  by_tag/<tag>/<collection UUID>/                  collections by tag (home cluster)
  home/                                            your home project (home cluster)
  shared/                                          projects shared with you (home cluster)
  clusters/<cluster id>/home/, .../shared/         the same on every cluster of the federation

Projects list their subprojects and collections by name and have a hidden .arvados#project
file (the project's record as JSON); listings are re-checked every few seconds.
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


def readme_file(context: MountContext, key: object, text: str) -> GeneratedFile:
    """A README with a keyed number of its own, dated when the mount started."""
    data = text.encode()
    node = GeneratedFile(context.table.number(("readme", key)), lambda: data, static=True,
                         mtime=lambda: context.started)
    context.table.bind(node.ino, node)
    return node


def stats_dir(context: MountContext) -> StaticDir:
    """``.fedmount/`` with ``stats.json``: a snapshot of the daemon's stats at each open."""
    def stats_json() -> bytes:
        return (json.dumps(context.stats.snapshot(), indent=1, sort_keys=True) + "\n").encode()

    table = context.table
    stats_ino = table.number(("stats", STATS_FILE_NAME))
    stats_file = GeneratedFile(stats_ino, stats_json, static=False, mtime=context.wall)
    table.bind(stats_ino, stats_file)
    node = StaticDir(table.number(("stats",)), {STATS_FILE_NAME: stats_file}, mtime=context.started,
                     negative_ttl=context.policy.negative_ttl)
    table.bind(node.ino, node)
    return node


def default_root(context: MountContext, loader: CollectionLoader, layout: Layout, hidden: dict[str, Node],
                 projects: ProjectTree | None) -> DirNode:
    """The root of a mount without ``--collection`` or ``--project`` (see `Layout`)."""
    if layout.mode in ("home", "shared", "by_tag"):
        assert projects is not None
        home = projects.source.home_cluster
        if layout.mode == "home":
            return projects.home(ROOT_INODE, home, hidden)
        if layout.mode == "shared":
            return projects.shared(ROOT_INODE, home, hidden)
        return tags_dir(projects, ROOT_INODE, hidden)
    table, entries = context.table, {}
    if layout.everything:
        assert projects is not None
        entries["README"] = readme_file(context, ROOT_INODE, ROOT_README.format(projects=PROJECTS_README))
        entries["by_id"] = CollectionIdDir.made(context, loader, "by_id", False, projects)
        entries["by_tag"] = tags_dir(projects, table.number(("dir", "by_tag")))
        entries["clusters"] = projects.clusters_dir(table.number(("dir", "clusters")))
        entries["home"] = projects.home(table.number(("dir", "home")), projects.source.home_cluster)
        entries["shared"] = projects.shared(table.number(("dir", "shared")), projects.source.home_cluster)
    elif layout.by_id or layout.by_pdh or layout.lists_projects:
        for names, pdh_only in ((layout.by_id, False), (layout.by_pdh, True)):
            for name in names:
                entries[name] = CollectionIdDir.made(context, loader, name, pdh_only, projects)
        for name in layout.by_tag:
            assert projects is not None
            entries[name] = tags_dir(projects, table.number(("dir", name)))
        for name in layout.home:
            assert projects is not None
            entries[name] = projects.home(table.number(("dir", name)), projects.source.home_cluster)
        for name in layout.shared:
            assert projects is not None
            entries[name] = projects.shared(table.number(("dir", name)), projects.source.home_cluster)
    else:
        entries["README"] = readme_file(context, ROOT_INODE, ROOT_README.format(projects=""))
        entries["by_id"] = CollectionIdDir.made(context, loader, "by_id", False)
    return StaticDir(ROOT_INODE, entries, mtime=context.started, negative_ttl=context.policy.negative_ttl,
                     hidden=hidden)


def tags_dir(projects: ProjectTree, ino: int, hidden: dict[str, Node] | None = None) -> TagsDir:
    node = TagsDir(projects, ino, projects.source.home_cluster, hidden)
    projects.context.table.bind(ino, node)
    return node


class CollectionIdDir(DirNode):
    """``by_id/`` (or ``by_pdh/``): collections of any cluster, appearing when looked up by
    UUID or PDH (by PDH only if `pdh_only`)."""

    def __init__(self, context: MountContext, loader: CollectionLoader, ino: int, name: str, pdh_only: bool,
                 projects: ProjectTree | None = None):
        self.context = context
        self.loader = loader
        self.projects = projects  # serves project and filter group uuids too, if given
        self.ino = ino
        self.name = name
        self.pdh_only = pdh_only
        # By canonical id: every spelling of a PDH (hints, leading zeros) is one collection.
        self._collections: dict[str, Collection] = {}
        self._negative = NegativeCache(context.policy.negative_ttl, context.clock)
        self._loading: dict[str, Call[Collection]] = {}
        self.readme = readme_file(context, ino, BY_PDH_README if pdh_only else BY_ID_README.format(name=name))

    @classmethod
    def made(cls, context: MountContext, loader: CollectionLoader, name: str,
             pdh_only: bool, projects: ProjectTree | None = None) -> CollectionIdDir:
        """A new one named `name` at the root, bound in the inode table."""
        node = cls(context, loader, context.table.number(("dir", name)), name, pdh_only, projects)
        context.table.bind(node.ino, node)
        return node

    def attr(self) -> Attr:
        return Attr(self.ino, True, 0, self.context.started, FOREVER, FOREVER)

    async def lookup(self, name: str) -> Node:
        context = self.context
        negative_ttl = context.policy.negative_ttl
        if name == "README":
            if not context.ready:
                raise FsError(errno.ENOENT)  # not cached: crunch-run polls for it
            return self.readme
        if self.projects is not None and not self.pdh_only and GROUP_UUID_RE.match(name):
            return await self.projects.by_id(self.ino, name)
        try:
            cid = parse_collection_id(name)
        except IdError:
            cid = None
        if cid is None or (self.pdh_only and not cid.is_pdh):
            context.stats.add("lookups_refused_locally")
            raise FsError(errno.ENOENT, cache_for=negative_ttl)
        key = cid.text
        coll = self._collections.get(key)
        if coll is None:
            if key in self._negative:
                context.stats.add("lookups_negative_cached")
                raise FsError(errno.ENOENT, cache_for=negative_ttl)
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
        calls, group = self.context.calls, api_group(cid)
        call = self._loading.get(key)
        if call is None:
            call = calls.start(group, f"loading collection {cid}", lambda: self._load(key, cid))
            self._loading[key] = call
        return await answer_by_deadline(call, calls, group, f"collection {cid}", self.context.stats, "lookup")

    async def _load(self, key: str, cid: CollectionId) -> Collection:
        context = self.context
        try:
            record, manifest = await self.loader.load(cid)
            root_ino = context.table.number((self.ino, key))
            coll = Collection(context, self.loader, cid, (self.ino, key), root_ino, record, manifest)
            self._collections[key] = coll
            return coll
        except FsError as e:
            if e.errno == errno.ENOENT:
                self._negative.add(key)
                e.cache_for = context.policy.negative_ttl
            raise
        finally:
            self._loading.pop(key, None)

    async def entries(self) -> list[tuple[str, Node]]:
        out: list[tuple[str, Node]] = [("README", self.readme)] if self.context.ready else []
        out.extend((name, coll.root) for name, coll in self._collections.items())
        if self.projects is not None:
            out.extend(self.projects.looked_up_by_id(self.ino))
        return out
