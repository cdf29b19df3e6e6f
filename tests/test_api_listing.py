"""`ProjectSource` without a network: which cluster each call goes to, keyset paging,
configurations, filters. The controller clients are fakes that answer from lists."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from fedmount.api.listing import ClusterConfig, ProjectSource, for_table
from fedmount.arvados.errors import ClusterUnreachable

ME = "zzzzz-tpzed-000000000000001"


async def _ignore(items: list[dict[str, Any]]) -> None:
    pass


def uuid(cluster: str, infix: str, i: int) -> str:
    return f"{cluster}-{infix}-{i:015d}"


@dataclass
class FakeClient:
    """Answers ``groups/<x>/contents``, ``groups/shared``, ``links`` and ``config`` from lists,
    applying the paging filter and limit as the API does."""

    cluster: str
    groups: list[dict[str, Any]] = field(default_factory=list)
    collections: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def call(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        params = params or {}
        self.calls.append((path, params))
        if path == "config":
            if self.config is None:
                raise ClusterUnreachable(self.cluster, "no config")
            return self.config
        filters = params.get("filters", [])
        if path == "links":
            return self._links(params)
        if path == "collections":
            wanted = next(f[2] for f in filters if f[:2] == ["uuid", "in"])
            return {"items": [c for c in self.collections if c["uuid"] in wanted][: params["limit"]]}
        rows = self.groups if ["uuid", "is_a", "arvados#group"] in filters else self.collections
        after = next((f[2] for f in filters if f[:2] == ["uuid", ">"]), "")
        rows = sorted((r for r in rows if r["uuid"] > after), key=lambda r: r["uuid"])
        limit = min(params.get("limit", 100), 1000)
        return {"items": rows[:limit], "limit": limit, "included": []}

    def _links(self, params: dict[str, Any]) -> dict[str, Any]:
        """``links`` as the API answers the two listings of tags: distinct names paged by
        offset, or links paged by uuid; the filters the listings use, and a limit of 1000."""
        rows = list(self.links)
        for name, op, value in params["filters"]:
            if op == "is_a":
                rows = [r for r in rows if "-4zz18-" in r[name]]  # arvados#collection
            elif op == ">":
                rows = [r for r in rows if r[name] > value]
            else:
                rows = [r for r in rows if (r[name] == value) == (op == "=")]
        limit = min(params["limit"], 1000)
        if params.get("distinct"):
            names = sorted({r["name"] for r in rows})[params.get("offset", 0) :][:limit]
            return {"items": [{"name": n} for n in names], "limit": limit}
        rows.sort(key=lambda r: r["uuid"])
        items = [{"uuid": r["uuid"], "head_uuid": r["head_uuid"]} for r in rows[:limit]]
        return {"items": items, "limit": limit}


@dataclass
class FakeFederation:
    clients: dict[str, FakeClient]
    home_cluster: str = "zzzzz"
    mode: str = "home"
    user: dict[str, Any] = field(default_factory=lambda: {"uuid": ME})

    @property
    def remote_clusters(self) -> list[str]:
        return sorted(c for c in self.clients if c != self.home_cluster)

    def controller(self, cluster: str) -> FakeClient:
        return self.clients[cluster]


@pytest.fixture
def federation() -> FakeFederation:
    home = FakeClient("zzzzz", config={"Collections": {"ForwardSlashNameSubstitution": "%2f"},
                                       "API": {"MaxItemsPerResponse": 1000}})  # fmt: skip
    remote = FakeClient("zbbbb", config={"Collections": {"ForwardSlashNameSubstitution": ""},
                                         "API": {"MaxItemsPerResponse": 500}})  # fmt: skip
    return FakeFederation({"zzzzz": home, "zbbbb": remote})


async def test_contents_pages_by_uuid_with_the_clusters_page_size_and_stops_at_a_short_page(federation):
    remote = federation.clients["zbbbb"]
    remote.groups = [{"uuid": uuid("zbbbb", "j7d0g", i), "name": f"p{i}"} for i in range(3)]
    remote.collections = [
        {
            "uuid": uuid("zbbbb", "4zz18", i),
            "name": f"c{i}",
            "current_version_uuid": uuid("zbbbb", "4zz18", i),
        }
        for i in range(1200)
    ] + [
        {
            "uuid": uuid("zbbbb", "4zz18", 5000),
            "name": "old",
            "current_version_uuid": uuid("zbbbb", "4zz18", 1),
        }
    ]
    source = ProjectSource(federation)
    pages: list[list[dict]] = []

    async def take(items: list[dict]) -> None:
        pages.append(items)

    await source.contents(ME, take, "zbbbb")
    items = [i for page in pages for i in page]
    assert [i["name"] for i in items[:3]] == ["p0", "p1", "p2"] and len(items) == 3 + 1200  # no old version
    assert [len(page) for page in pages] == [3, 500, 500, 200]  # handed over a page at a time
    listings = [p for path, p in remote.calls if path.endswith("/contents")]
    assert len(listings) == 1 + 3  # one page of groups; 500 + 500 + 201 collections
    assert {p["limit"] for p in listings} == {500} and {p["count"] for p in listings} == {"none"}
    assert listings[2]["filters"][-1] == ["uuid", ">", uuid("zbbbb", "4zz18", 499)]
    assert all(p["order"] == ["uuid asc"] for p in listings)
    assert federation.clients["zzzzz"].calls == []  # asked of that cluster only


async def test_a_project_is_asked_of_the_cluster_that_owns_it(federation):
    source = ProjectSource(federation)
    project = uuid("zbbbb", "j7d0g", 7)
    await source.contents(project, _ignore)
    await source.find(project, ["x"])
    assert [path for path, _ in federation.clients["zbbbb"].calls if path != "config"] == [
        f"groups/{project}/contents"] * 4  # fmt: skip
    assert federation.clients["zzzzz"].calls == []


def test_cluster_configuration_as_arv_mount_reads_it():
    assert ClusterConfig.of({"Collections": {"ForwardSlashNameSubstitution": "%2f"}}) == ClusterConfig(
        "%2f", 1000
    )
    assert ClusterConfig.of({"Collections": {"ForwardSlashNameSubstitution": "/"}}).slash_substitution is None
    assert ClusterConfig.of({"Collections": {"ForwardSlashNameSubstitution": ""}}).slash_substitution is None
    assert ClusterConfig.of(None) == ClusterConfig("_", 1000)  # unreadable: arv-mount's default
    assert ClusterConfig.of({"API": {"MaxItemsPerResponse": 500}}).page_size == 500


async def test_an_unreadable_configuration_is_read_once_and_defaults(federation):
    federation.clients["zbbbb"].config = None
    source = ProjectSource(federation)
    assert await source.config("zbbbb") == await source.config("zbbbb") == ClusterConfig("_", 1000)
    assert [path for path, _ in federation.clients["zbbbb"].calls] == ["config"]


def test_filters_go_to_the_tables_they_name():
    filters = [["name", "like", "x%"], ["collections.file_count", ">", 1], ["groups.name", "=", "p"]]
    wanted = [["name", "like", "x%"], ["collections.file_count", ">", 1]]
    assert for_table(filters, "collections", qualified=True) == wanted
    assert for_table(filters, "groups", qualified=False) == [["name", "like", "x%"], ["name", "=", "p"]]
    assert json.dumps(for_table(filters, "links", qualified=False)) == '[["name", "like", "x%"]]'


def test_every_cluster_of_the_federation_is_listed_home_first(federation):
    assert ProjectSource(federation).clusters == ["zzzzz", "zbbbb"]


@pytest.mark.parametrize("mode", ["home", "direct"])
async def test_collection_summaries_are_one_uuid_in_request_per_page_of_the_asked_cluster(federation, mode):
    federation.mode = mode
    asked = federation.clients["zzzzz" if mode == "home" else "zbbbb"]
    remote = [{"uuid": uuid("zbbbb", "4zz18", i), "portable_data_hash": f"{i:032x}+0",
               "modified_at": "2024-01-02T03:04:05.5Z"} for i in range(1200)]  # fmt: skip
    asked.collections = remote
    uuids = [c["uuid"] for c in remote] + [uuid("zbbbb", "4zz18", 9999)]  # one gone
    found = await ProjectSource(federation).collection_summaries("zbbbb", uuids)
    assert sorted(found) == sorted(c["uuid"] for c in remote)
    assert found[remote[7]["uuid"]] == (f"{7:032x}+0", 1704164645.5)
    requests = [p for path, p in asked.calls if path == "collections"]
    # The asked cluster's page: the home's 1000 (it pages the owner itself), or the owner's 500.
    assert [len(p["filters"][0][2]) for p in requests] == ([1000, 201] if mode == "home" else [500, 500, 201])
    if mode == "home":
        assert federation.clients["zbbbb"].calls == []  # home mode never contacts the owner
    # As the controller forwards it: the uuid filter alone, count=none, no order or offset.
    assert all(len(p["filters"]) == 1 and p["count"] == "none" for p in requests)
    assert all("order" not in p and "offset" not in p for p in requests)
    assert all(p["limit"] == len(p["filters"][0][2]) for p in requests)
    assert all(p["select"] == ["uuid", "portable_data_hash", "modified_at"] for p in requests)


def tag_link(i: int, name: str, head: str) -> dict[str, Any]:
    return {"uuid": uuid("zbbbb", "o0j2j", i), "link_class": "tag", "name": name, "head_uuid": head}


async def test_by_tag_lists_every_tag_and_every_tagged_collection_over_many_small_pages(federation):
    remote = federation.clients["zbbbb"]
    remote.config = {"API": {"MaxItemsPerResponse": 3}}
    names = [f"tag{t:02d}" for t in range(8)]  # 8 names over 3 pages (offsets 0, 3, 6)
    remote.links = [tag_link(i, names[i % 8], uuid("zbbbb", "4zz18", 900 + i)) for i in range(16)]
    demo = [uuid("zbbbb", "4zz18", i) for i in range(7)]
    remote.links += [tag_link(100 + i, "demo", head) for i, head in enumerate(demo)]
    remote.links.append(tag_link(200, "demo", demo[0]))  # a second tag link on the same collection
    remote.links.append(tag_link(201, "demo", uuid("zbbbb", "j7d0g", 1)))  # a project: not under by_tag
    source = ProjectSource(federation)
    assert await source.tags("zbbbb") == sorted([*names, "demo"])  # 9 names: a last, empty page
    pages = [p for path, p in remote.calls if path == "links" and p.get("distinct")]
    assert [p["offset"] for p in pages] == [0, 3, 6, 9] and {p["limit"] for p in pages} == {3}
    remote.calls.clear()
    assert await source.tagged("zbbbb", "demo") == demo  # each once, collections only
    pages = [p for path, p in remote.calls if path == "links"]
    assert len(pages) == 3  # 8 links on collections: 3 + 3 + 2
    assert pages[1]["filters"][-1] == ["uuid", ">", uuid("zbbbb", "o0j2j", 102)]
    assert federation.clients["zzzzz"].calls == []  # asked of that cluster only
