"""Listing projects, shared projects and tags of any cluster of the federation, paged.

Every call goes to the cluster that owns what is listed, through `Federation.controller`:
the home client for the home cluster, otherwise the client made with the token salted for
that cluster (the home token never leaves home). Asking the owner itself keeps every query
federation-safe: the controller forwards a list only in narrow cases (a ``uuid`` filter
alone, ``count=none``, no ``order``: ``lib/controller/federation/list.go``) and answers
400 to a remote uuid mixed with other filters, and a list filtered on ``owner_uuid`` is
answered from the local database only, so a lookup by name in a remote project made at
home finds nothing (arv-mount's ENOENT).

- `ProjectSource.contents`: ``groups/<uuid>/contents`` (a project, a filter group, or a
  user: what the user owns on that cluster), in two passes as arv-mount makes them (projects
  and filter groups, then collections: ``#17424``), each with keyset paging: ``order=uuid``,
  ``count=none``, ``limit`` the cluster's ``API.MaxItemsPerResponse``, the next page after
  ``["uuid", ">", last]``. A page shorter than the ``limit`` the answer reports is the last,
  so a listing costs one request per page per kind. Collections come with only what a
  listing uses (``select``: uuid, name, modification time, current version) and old versions
  are left out. Each page goes to the caller's ``take`` before the next is asked for, so a
  listing holds one page of decoded records at a time (issue 17: the records of a whole
  listing alive at once left their freed memory resident, pinned by what the entries keep).
- `ProjectSource.find`: one name in a project never listed, as keep-web's project
  filesystem asks (``sdk/go/arvados/fs_project.go`` ``projectsLoadOne``): the contents of
  that project with a ``name`` filter, routed by the project's uuid.
- `ProjectSource.shared`: ``groups/shared`` with ``include=owner_uuid``, paged the same way.
- `ProjectSource.tags` and `tagged`: tag links (``links`` with ``distinct``, ``select``),
  every page (arv-mount stops at one page of 1,000).
- `ProjectSource.collection_summaries`: what decides whether many mounted UUID collections
  of one cluster changed (uuid, portable data hash, modification time), one request per
  page of them: a ``uuid in`` filter alone with ``count=none`` and no ``order`` or
  ``offset``, the one list the controller forwards across the federation (in home and auto
  modes the home is asked and forwards it, paging the owner itself; in direct mode the owner is
  asked). A request names at most the asked cluster's ``MaxItemsPerResponse`` uuids (the
  controller's limit for a federated list); home and auto modes never contact the owner.
- `ProjectSource.config`: what the names and pages depend on in a cluster's exported
  configuration (``GET config``, read once per cluster).

`--filters` (arv-mount's ``Directory._filters_for``): a filter on ``table.column`` applies
to that table's queries only, one on a bare column to every query.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import trio

from fedmount.arvados.errors import ApiError, BadAnswer

from .controller import ControllerClient
from .federation import parse_timestamp

GROUP_CLASSES = ["project", "filter"]
COLLECTION_FIELDS = ["uuid", "name", "modified_at", "current_version_uuid"]  # what a listing uses
SUMMARY_FIELDS = ["uuid", "portable_data_hash", "modified_at"]  # what decides a re-check
DEFAULT_PAGE = 1000  # API.MaxItemsPerResponse by default
DEFAULT_SUBSTITUTION = "_"  # what arv-mount uses when the configuration cannot be read

Take = Callable[[list[dict[str, Any]]], Awaitable[None]]  # what is done with a page of records
TakeAnswer = Callable[[dict[str, Any]], Awaitable[None]]  # ... with a page's whole answer


class ControllersLike(Protocol):
    """What `ProjectSource` needs of the `Federation`."""

    home_cluster: str
    mode: str  # "home", "auto": a remote collection is asked of the home cluster; "direct": of its owner
    user: dict[str, Any]  # users/current at the home cluster

    @property
    def remote_clusters(self) -> list[str]: ...

    def controller(self, cluster: str) -> ControllerClient: ...


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """What a cluster's exported configuration says about names and pages."""

    slash_substitution: str | None  # for "/" in a name; None: "/" becomes "_" as NUL does
    page_size: int  # API.MaxItemsPerResponse

    @classmethod
    def of(cls, exported: dict[str, Any] | None) -> ClusterConfig:
        """From ``GET config`` (None: it could not be read), as arv-mount reads it."""
        if exported is None:
            return cls(DEFAULT_SUBSTITUTION, DEFAULT_PAGE)
        collections = exported.get("Collections") or {}
        substitution = collections.get("ForwardSlashNameSubstitution", "")
        if not isinstance(substitution, str) or substitution in ("", "/"):
            substitution = None
        page = (exported.get("API") or {}).get("MaxItemsPerResponse")
        return cls(substitution, page if isinstance(page, int) and page > 0 else DEFAULT_PAGE)


def for_table(filters: Sequence[Sequence[Any]], table: str, *, qualified: bool) -> list[list[Any]]:
    """The `--filters` that apply to `table` (arv-mount's ``_filters_for``): those on a bare
    attribute, and those on ``table.attribute`` (as written if `qualified`, else bare)."""
    out: list[list[Any]] = []
    for f in filters:
        attribute = str(f[0])
        kind, dot, name = attribute.partition(".")
        if not dot:
            out.append(list(f))
        elif kind == table:
            out.append([attribute if qualified else name, *f[1:]])
    return out


def cluster_of(uuid: str) -> str:
    return uuid[:5]


class ProjectSource:
    """The listing calls of the federation (see the module docstring)."""

    def __init__(self, federation: ControllersLike, filters: Sequence[Sequence[Any]] = ()):
        self.federation = federation
        self.filters = [list(f) for f in filters]
        self._configs: dict[str, ClusterConfig] = {}
        self._config_lock = trio.Lock()

    @property
    def home_cluster(self) -> str:
        return self.federation.home_cluster

    @property
    def clusters(self) -> list[str]:
        """Every cluster of the federation: the home cluster, then its remotes."""
        return [self.federation.home_cluster, *self.federation.remote_clusters]

    @property
    def user(self) -> dict[str, Any]:
        return self.federation.user

    def _client(self, cluster: str) -> ControllerClient:
        return self.federation.controller(cluster)

    async def config(self, cluster: str) -> ClusterConfig:
        """`cluster`'s configuration, read once; arv-mount's defaults if it cannot be read."""
        async with self._config_lock:
            config = self._configs.get(cluster)
            if config is None:
                try:
                    exported: dict[str, Any] | None = await self._client(cluster).call("config")
                except ApiError:
                    exported = None
                config = self._configs[cluster] = ClusterConfig.of(exported)
            return config

    async def get(self, uuid: str) -> dict[str, Any]:
        """The record of a project, filter group or user, from the cluster that owns it."""
        resource = "users" if "-tpzed-" in uuid else "groups"
        return await self._client(cluster_of(uuid)).call(f"{resource}/{quote(uuid, safe='')}")

    async def _pages(
        self, cluster: str, path: str, params: dict[str, Any], filters: list[list[Any]], take: TakeAnswer
    ) -> None:
        """Every answer of a keyset-paged list (see the module docstring), each handed to
        `take` before the next page is asked for."""
        client = self._client(cluster)
        page_size = (await self.config(cluster)).page_size
        after: list[list[Any]] = []
        while True:
            query = {**params, "filters": filters + after, "order": ["uuid asc"], "count": "none",
                     "limit": page_size}  # fmt: skip
            last = await self._page(client, path, query, take)
            if last is None:
                return
            after = [["uuid", ">", last]]

    async def _page(
        self, client: ControllerClient, path: str, query: dict[str, Any], take: TakeAnswer
    ) -> str | None:
        """One answer (its ``items`` a list) handed to `take`; the uuid to page after, or None
        if it was the last. Its decoded records are garbage once this returns, before the next
        page is decoded: a listing never holds two pages of them, and what `take` keeps of one
        page lies amid the records of the next, not amid ten thousand freed ones (pymalloc
        frees an arena only once all of it is free)."""
        answer = await client.call(path, query)
        items = answer.get("items")
        if not isinstance(items, list):
            raise BadAnswer(client.cluster, f"GET {path}: the answer has no list of items")
        await take(answer)
        limit = answer.get("limit")
        if not items or len(items) < (limit if isinstance(limit, int) and limit > 0 else query["limit"]):
            return None
        last = items[-1].get("uuid") if isinstance(items[-1], dict) else None
        if not isinstance(last, str):
            raise BadAnswer(client.cluster, f"GET {path}: an item without a uuid")
        return last

    async def contents(self, owner: str, take: Take, cluster: str | None = None) -> None:
        """What `owner` (a project, filter group or user) holds on `cluster` (default: the
        owner's), a page at a time to `take`: its projects and filter groups, then its
        current collections."""
        cluster = cluster or cluster_of(owner)
        path = f"groups/{quote(owner, safe='')}/contents"
        groups = [["uuid", "is_a", "arvados#group"], ["groups.group_class", "in", GROUP_CLASSES],
                  *for_table(self.filters, "groups", qualified=True)]  # fmt: skip
        collections = [
            ["uuid", "is_a", "arvados#collection"],
            *for_table(self.filters, "collections", qualified=True),
        ]

        async def all_of(answer: dict[str, Any]) -> None:
            await take(answer["items"])

        async def current(answer: dict[str, Any]) -> None:
            await take([c for c in answer["items"]
                        if c.get("current_version_uuid", c.get("uuid")) == c.get("uuid")])  # fmt: skip

        await self._pages(cluster, path, {}, groups, all_of)
        await self._pages(cluster, path, {"select": COLLECTION_FIELDS}, collections, current)

    async def find(
        self, owner: str, names: Sequence[str], cluster: str | None = None
    ) -> list[dict[str, Any]]:
        """The projects or filter groups, else the collections, of `owner` named one of
        `names` (at most two of each), asked of `cluster` (default: the owner's)."""
        client = self._client(cluster or cluster_of(owner))
        path = f"groups/{quote(owner, safe='')}/contents"
        name = ["name", "=", names[0]] if len(names) == 1 else ["name", "in", list(names)]
        queries = [
            [["uuid", "is_a", "arvados#group"], ["groups.group_class", "in", GROUP_CLASSES], name,
             *for_table(self.filters, "groups", qualified=True)],
            [["uuid", "is_a", "arvados#collection"], name,
             *for_table(self.filters, "collections", qualified=True)],
        ]  # fmt: skip
        for filters in queries:
            answer = await client.call(
                path, {"filters": filters, "count": "none", "limit": 2, "order": ["uuid asc"]}
            )
            items = [
                i
                for i in answer.get("items") or []
                if i.get("current_version_uuid", i.get("uuid")) == i.get("uuid")
            ]
            if items:
                return items
        return []

    async def shared(self, cluster: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The projects and filter groups shared with the user on `cluster`, and their owners."""
        filters = [["group_class", "in", GROUP_CLASSES], *for_table(self.filters, "groups", qualified=False)]
        roots: list[dict[str, Any]] = []
        owners: dict[str, dict[str, Any]] = {}

        async def take(answer: dict[str, Any]) -> None:
            roots.extend(answer["items"])
            for owner in answer.get("included") or []:
                if isinstance(owner, dict) and isinstance(owner.get("uuid"), str):
                    owners[owner["uuid"]] = owner

        await self._pages(cluster, "groups/shared", {"include": "owner_uuid"}, filters, take)
        return roots, list(owners.values())

    async def collection_summaries(
        self, cluster: str, uuids: Sequence[str]
    ) -> dict[str, tuple[str, float | None]]:
        """(portable data hash, modification time) of each of collections `uuids` of
        `cluster` that the user can read, by uuid (one missing is gone, trashed or not
        readable): see the module docstring."""
        # Home and auto modes read records through the home, which pages the owner itself.
        asked = cluster if self.federation.mode == "direct" else self.home_cluster
        page = (await self.config(asked)).page_size
        client = self._client(asked)
        found: dict[str, tuple[str, float | None]] = {}
        for start in range(0, len(uuids), page):
            chunk = list(uuids[start : start + page])
            params = {"filters": [["uuid", "in", chunk]], "count": "none", "limit": len(chunk),
                      "select": SUMMARY_FIELDS}  # fmt: skip
            answer = await client.call("collections", params)
            for item in answer.get("items") or []:
                if isinstance(item, dict) and isinstance(item.get("uuid"), str):
                    pdh = item.get("portable_data_hash")
                    if isinstance(pdh, str) and pdh:
                        found[item["uuid"]] = (pdh, parse_timestamp(item.get("modified_at")))
        return found

    async def tags(self, cluster: str) -> list[str]:
        """Every tag name on `cluster` (all pages)."""
        filters = [
            ["link_class", "=", "tag"],
            ["name", "!=", ""],
            *for_table(self.filters, "links", qualified=False),
        ]
        names: list[str] = []
        page_size = (await self.config(cluster)).page_size
        client = self._client(cluster)
        offset = 0
        while True:  # distinct names have no uuid to page after: offset paging, as the API allows it
            answer = await client.call("links", {"filters": filters, "select": ["name"], "distinct": True,
                                                 "count": "none", "limit": page_size, "offset": offset,
                                                 "order": ["name asc"]})  # fmt: skip
            items = answer.get("items") or []
            names.extend(str(i.get("name")) for i in items if isinstance(i, dict) and i.get("name"))
            if len(items) < page_size:
                return names
            offset += len(items)

    async def tagged(self, cluster: str, tag: str) -> list[str]:
        """The uuids of the collections carrying `tag` on `cluster` (all pages)."""
        filters = [["link_class", "=", "tag"], ["name", "=", tag],
                   ["head_uuid", "is_a", "arvados#collection"],
                   *for_table(self.filters, "links", qualified=False)]  # fmt: skip
        heads: dict[str, None] = {}

        async def take(answer: dict[str, Any]) -> None:
            heads.update((str(i["head_uuid"]), None) for i in answer["items"]
                         if isinstance(i, dict) and i.get("head_uuid"))  # fmt: skip

        await self._pages(cluster, "links", {"select": ["uuid", "head_uuid"]}, filters, take)
        return list(heads)
