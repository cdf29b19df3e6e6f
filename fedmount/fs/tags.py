"""``by_tag/``: collections by the tags (``link_class`` tag links) they carry.

``by_tag/`` lists every tag name of the home cluster and ``by_tag/<tag>/`` every
collection carrying that tag, named by uuid, as arv-mount's ``TagsDirectory`` and
``TagDirectory`` do; but all of them, page after page (arv-mount asks one page: at most
1,000 tags, and the server's default page of tagged collections). A tagged collection is
loaded when someone looks inside it (`ListedCollectionDir`); both levels refresh when
touched after ``refresh_time``.
"""

from __future__ import annotations

from .listed import ListedCollectionDir, ListedDir, PageNumbers, asked
from .names import entry_name
from .nodes import Node
from .projects import COLLECTION_UUID_RE, ProjectTree


class TagsDir(ListedDir):
    """``by_tag/``: a directory per tag name."""

    def __init__(self, tree: ProjectTree, ino: int, cluster: str, hidden: dict[str, Node] | None = None):
        super().__init__(
            tree.context, ino, f"tags of cluster {cluster}", cluster, tree.context.started, hidden
        )
        self.tree = tree
        self._tags: dict[str, TagDir] = {}

    async def _list(self) -> dict[str, Node]:
        names = await asked(self.subject, self.tree.source.tags(self.cluster), self.context)
        substitution = (await self.tree.source.config(self.cluster)).slash_substitution
        out: dict[str, Node] = {}
        for tag in names:
            name = entry_name(tag, substitution)
            if name is None or name in out:
                continue
            node = self._tags.get(tag)
            if node is None:
                ino = self.context.table.number((self.ino, "tag", tag))
                node = self._tags[tag] = TagDir(self.tree, ino, self.cluster, tag)
                self.context.table.bind(ino, node)
            out[name] = node
        return out


class TagDir(ListedDir):
    """``by_tag/<tag>/``: the collections carrying the tag, by uuid."""

    def __init__(self, tree: ProjectTree, ino: int, cluster: str, tag: str):
        super().__init__(
            tree.context, ino, f"tag {tag!r} of cluster {cluster}", cluster, tree.context.started
        )
        self.tree = tree
        self.tag = tag

    async def _list(self) -> dict[str, Node]:
        heads = await asked(self.subject, self.tree.source.tagged(self.cluster, self.tag), self.context)
        out: dict[str, Node] = {}
        numbers = PageNumbers(self.context.table, len(heads))
        for uuid in heads:
            if not COLLECTION_UUID_RE.match(uuid):
                continue
            node = self.known.get(uuid)
            if node is None:
                node = self.known[uuid] = numbers.add(
                    lambda ino: ListedCollectionDir(self.tree, ino, {"uuid": uuid})  # noqa: B023 (called at once)
                )
            out[uuid] = node
        return out
