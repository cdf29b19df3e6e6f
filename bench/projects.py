"""Project trees for the benchmark: made through the API, and paged with a bare client.

The emulator's control endpoint adds collections owned by the user only, so the projects
of the project workloads are made as a user makes them, through the home controller's API
(``POST groups``, ``POST collections`` with an ``owner_uuid`` and an empty manifest), over
one kept-alive HTTPS connection: about a millisecond of the emulator's time each, so
10,000 collections take seconds, not the minutes the SDK's per-call set-up costs.

`ContentsPager` is the ceiling of a listing: what a bare HTTP client does to list what a
project holds, asking exactly what fedmount asks (`fedmount.api.listing.ProjectSource.
contents`): ``groups/UUID/contents`` in two keyset-paged passes, projects and filter groups
then collections (``select`` of the listing's fields, old versions dropped), ``order=uuid``,
``count=none``, pages of ``PAGE`` items, one request after the other on one connection,
each answer decoded and nothing kept. `ContentsPager.tree` pages a project and every
project under it, as ``find`` lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from fedmount.api.listing import COLLECTION_FIELDS, GROUP_CLASSES

from .ceilings import ClusterAccess
from .workloads import BenchError

PAGE = 1000  # the emulated clusters' API.MaxItemsPerResponse, as fedmount reads it


class ApiClient:
    """A bare HTTPS client of one controller: one connection, kept alive."""

    def __init__(self, access: ClusterAccess) -> None:
        self.access = access
        self.pool = urllib3.HTTPSConnectionPool(
            *_host_port(access.api_host), maxsize=1, ca_certs=access.ca_cert, retries=False,
            timeout=urllib3.Timeout(connect=10, read=120),
        )  # fmt: skip

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.pool.request(
            method,
            f"/arvados/v1/{path}",
            body=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.access.token}", "Content-Type": "application/json"},
        )
        if resp.status != 200:
            raise BenchError(f"{method} {path.split('?')[0]} answered {resp.status}: {resp.data[:200]!r}")
        return json.loads(resp.data)

    def project(self, owner: str, name: str) -> tuple[str, str]:
        """Make a project; its (uuid, name): `name`, or another if `owner` already has it (a
        federation used by an earlier run, ``--federation``)."""
        body = {"group": {"name": name, "group_class": "project", "owner_uuid": owner}}
        made = self.call("POST", "groups?ensure_unique_name=true", body)
        return str(made["uuid"]), str(made["name"])

    def empty_collection(self, owner: str, name: str) -> str:
        body = {"collection": {"name": name, "owner_uuid": owner, "manifest_text": ""}}
        return str(self.call("POST", "collections", body)["uuid"])


@dataclass(frozen=True)
class ProjectTree:
    """A project made for the benchmark: its name in its owner, uuid, and what it holds."""

    name: str
    uuid: str
    projects: int  # subprojects, one level below it
    collections: int  # in it and in each subproject: per_project * projects + its own

    @property
    def entries(self) -> int:
        """What ``find`` of it prints down to the collections: itself, its projects, its collections."""
        return 1 + self.projects + self.collections


def make_project(api: ApiClient, owner: str, name: str, collections: int) -> ProjectTree:
    """A project of `collections` empty collections."""
    uuid, name = api.project(owner, name)
    for i in range(collections):
        api.empty_collection(uuid, f"c{i:06d}")
    return ProjectTree(name, uuid, 0, collections)


def make_tree(api: ApiClient, owner: str, name: str, projects: int, per_project: int) -> ProjectTree:
    """A project holding `projects` subprojects of `per_project` empty collections each."""
    uuid, name = api.project(owner, name)
    for p in range(projects):
        sub, _ = api.project(uuid, f"p{p:05d}")
        for i in range(per_project):
            api.empty_collection(sub, f"c{i:03d}")
    return ProjectTree(name, uuid, projects, projects * per_project)


class ContentsPager:
    """The bare client's listing of projects (see the module docstring)."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def _pages(self, owner: str, filters: list[list[Any]], select: list[str] | None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after: list[list[Any]] = []
        while True:
            params = {"filters": json.dumps(filters + after), "order": json.dumps(["uuid asc"]),
                      "count": "none", "limit": PAGE}  # fmt: skip
            if select:
                params["select"] = json.dumps(select)
            path = f"groups/{quote(owner, safe='')}/contents?{urlencode(params)}"
            page = self.api.call("GET", path)["items"]
            items += page
            if len(page) < PAGE:
                return items
            after = [["uuid", ">", page[-1]["uuid"]]]

    def contents(self, owner: str) -> tuple[list[str], int]:
        """(the uuids of the projects and filter groups `owner` holds, how many current collections)."""
        groups = self._pages(
            owner, [["uuid", "is_a", "arvados#group"], ["groups.group_class", "in", GROUP_CLASSES]], None
        )
        colls = self._pages(owner, [["uuid", "is_a", "arvados#collection"]], COLLECTION_FIELDS)
        current = sum(c.get("current_version_uuid", c["uuid"]) == c["uuid"] for c in colls)
        return [g["uuid"] for g in groups], current

    def tree(self, root: str) -> int:
        """List `root` and every project under it; the entries ``find`` would print (see
        `ProjectTree.entries`)."""
        entries, pending = 1, [root]
        while pending:
            subprojects, collections = self.contents(pending.pop())
            entries += len(subprojects) + collections
            pending += subprojects
        return entries


def _host_port(api_host: str) -> tuple[str, int]:
    host, port = api_host.rsplit(":", 1)
    return host, int(port)
