"""bench.projects without a socket: the bare client's paging of a project tree (a fake
`ApiClient` answering like ``groups/UUID/contents``), and what ``find`` of a tree prints."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench import projects
from bench.projects import ContentsPager, ProjectTree

ROOT = "zzzzz-j7d0g-000000000000000"


class FakeApi:
    """A tree held as {owner: [records]}; answers contents pages the way the controller does
    (keyset on uuid, `limit` items), and records every request."""

    def __init__(self, tree: dict[str, list[dict[str, Any]]]) -> None:
        self.tree = tree
        self.asked: list[tuple[str, list[Any], str | None]] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        assert method == "GET" and body is None
        where, query = urlsplit(path).path, parse_qs(urlsplit(path).query)
        owner = where.split("/")[1]
        filters = json.loads(query["filters"][0])
        assert query["count"] == ["none"] and json.loads(query["order"][0]) == ["uuid asc"]
        kind = filters[0][2]
        after = next((f[2] for f in filters if f[1] == ">"), "")
        rows = sorted(
            (r for r in self.tree.get(owner, []) if r["kind"] == kind and r["uuid"] > after),
            key=lambda r: r["uuid"],
        )
        self.asked.append((owner, filters, query.get("select", [None])[0]))
        return {"items": rows[: int(query["limit"][0])]}


def project(i: int) -> dict[str, Any]:
    return {"kind": "arvados#group", "uuid": f"zzzzz-j7d0g-{i:015d}", "group_class": "project"}


def collection(owner: int, i: int, current: bool = True) -> dict[str, Any]:
    uuid = f"zzzzz-4zz18-{owner:07d}{i:08d}"
    return {"kind": "arvados#collection", "uuid": uuid, "current_version_uuid": uuid if current else "x"}


def test_contents_pages_both_kinds_until_a_short_page_and_drops_old_versions(monkeypatch):
    monkeypatch.setattr(projects, "PAGE", 3)
    rows = [collection(0, i) for i in range(7)] + [collection(0, 7, current=False), project(1)]
    api = FakeApi({ROOT: rows})
    subprojects, collections = ContentsPager(api).contents(ROOT)  # type: ignore[arg-type]
    assert subprojects == [project(1)["uuid"]] and collections == 7
    kinds = [f[0][2] for _, f, _ in api.asked]
    # one page of groups, then 8 collections in pages of 3: 3, 3, 2 (the short one is the last)
    assert kinds == ["arvados#group"] + ["arvados#collection"] * 3
    assert [f[-1] for _, f, _ in api.asked][2][:2] == ["uuid", ">"]
    assert all(s is not None for _, f, s in api.asked if f[0][2] == "arvados#collection")


def test_tree_lists_every_project_under_the_root_and_counts_what_find_prints():
    subs = [project(i) for i in range(1, 4)]
    tree = {ROOT: [*subs, collection(0, 0)]}
    for i, p in enumerate(subs, 1):
        tree[p["uuid"]] = [collection(i, k) for k in range(2)]
    tree[subs[0]["uuid"]].append(project(9))  # a project two levels down
    api = FakeApi(tree)
    assert ContentsPager(api).tree(ROOT) == 1 + 3 + 1 + 3 * 2 + 1  # type: ignore[arg-type]
    assert {owner for owner, _, _ in api.asked} == {ROOT, project(9)["uuid"], *(p["uuid"] for p in subs)}


def test_project_tree_entries_are_itself_its_projects_and_their_collections():
    assert ProjectTree("t", ROOT, 1000, 4000).entries == 5001
    assert ProjectTree("many", ROOT, 0, 10_000).entries == 10_001
