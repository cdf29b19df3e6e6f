"""The project tree without a mount: names, collisions, lookups, loops, refresh, failures.

The projects come from a small fake of `ProjectSource` (what the API would list); the
collections in them from the fake federation of `fsworld`, so a test can tell a listing
(no manifest) from a look inside (one).
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from fsworld import (  # tests/ is on sys.path under pytest
    NOW,
    UUID_A,
    UUID_B,
    names,
    path_node,
    read_all,
    settle,
    world_fixture,  # noqa: F401 (a fixture)
)

from fedmount.api.listing import ClusterConfig, Take
from fedmount.arvados.errors import ClusterUnreachable
from fedmount.fs.errors import FsError
from fedmount.fs.inodes import ROOT_INODE
from fedmount.fs.layout import Layout

ME = "zzzzz-tpzed-000000000000001"
OTHER = "zzzzz-tpzed-000000000000002"
P1 = "zzzzz-j7d0g-000000000000001"
P2 = "zzzzz-j7d0g-000000000000002"
LOOP = "zzzzz-j7d0g-00000000000loop"
REMOTE = "zbbbb-j7d0g-000000000000001"
SHARED = "zzzzz-j7d0g-0000000000share"
ORPHAN = "zzzzz-j7d0g-000000000orphan"


def group(uuid: str, name: str, owner: str, group_class: str = "project") -> dict[str, Any]:
    return {"uuid": uuid, "name": name, "owner_uuid": owner, "group_class": group_class,
            "modified_at": "2026-01-02T03:04:05Z"}  # fmt: skip


def collection(uuid: str, name: str, owner: str) -> dict[str, Any]:
    return {"uuid": uuid, "name": name, "owner_uuid": owner, "modified_at": "2026-01-02T03:04:05Z"}


@dataclass
class FakeSource:
    """`ProjectSource` over dicts: `listed[(owner, cluster)]`, in listing order."""

    listed: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, ClusterConfig] = field(default_factory=dict)
    shares: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = field(default_factory=dict)
    tag_heads: dict[str, list[str]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    stall: dict[str, trio.Event] = field(default_factory=dict)
    asked: list[tuple[str, ...]] = field(default_factory=list)
    home_cluster: str = "zzzzz"
    clusters: list[str] = field(default_factory=lambda: ["zzzzz", "zbbbb"])
    user: dict[str, Any] = field(default_factory=lambda: {"uuid": ME, "first_name": "Me", "last_name": "Me"})

    async def _check(self, cluster: str) -> None:
        if cluster in self.stall:
            await self.stall[cluster].wait()
        if cluster in self.down:
            raise ClusterUnreachable(cluster, "connection refused")

    async def config(self, cluster: str) -> ClusterConfig:
        return self.configs.get(cluster, ClusterConfig("%2f", 1000))

    async def get(self, uuid: str) -> dict[str, Any]:
        self.asked.append(("get", uuid))
        await self._check(uuid[:5])
        return self.records[uuid]

    async def contents(self, owner: str, take: Take, cluster: str | None = None) -> None:
        cluster = cluster or owner[:5]
        self.asked.append(("contents", owner, cluster))
        await self._check(cluster)
        await take(list(self.contents_of(owner, cluster)))

    def contents_of(self, owner: str, cluster: str) -> list[dict[str, Any]]:
        return self.listed.get((owner, cluster), [])

    async def find(self, owner: str, wanted: list[str], cluster: str | None = None) -> list[dict[str, Any]]:
        cluster = cluster or owner[:5]
        self.asked.append(("find", owner, cluster, *wanted))
        await self._check(cluster)
        items = self.contents_of(owner, cluster)
        groups = [i for i in items if "-j7d0g-" in i["uuid"] and i["name"] in wanted]
        return groups or [i for i in items if "-4zz18-" in i["uuid"] and i["name"] in wanted]

    async def shared(self, cluster: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        self.asked.append(("shared", cluster))
        await self._check(cluster)
        return self.shares.get(cluster, ([], []))

    async def tags(self, cluster: str) -> list[str]:
        return list(self.tag_heads)

    async def tagged(self, cluster: str, tag: str) -> list[str]:
        return self.tag_heads[tag]


@pytest.fixture
def source() -> FakeSource:
    s = FakeSource()
    s.listed[(ME, "zzzzz")] = [
        group(P1, "analysis", ME),
        group(LOOP, "loop", ME, "filter"),
        collection(UUID_A, "analysis", ME),  # the subproject of that name wins
        collection("zzzzz-4zz18-000000000000dot", ".", ME),
        collection("zzzzz-4zz18-000000000dotdot", "..", ME),
        collection("zzzzz-4zz18-0000000000slash", "2024/03 run", ME),
        collection("zzzzz-4zz18-000000000nul000", "a\x00b", ME),
        collection("zzzzz-4zz18-0000000000empty", "", ME),
    ]
    s.listed[(P1, "zzzzz")] = [collection(UUID_A, "results", P1)]
    s.listed[(LOOP, "zzzzz")] = [group(LOOP, "loop", ME, "filter"), collection(UUID_A, "hello", P1)]
    s.listed[(ME, "zbbbb")] = [group(REMOTE, "work on zbbbb", ME)]
    s.listed[(REMOTE, "zbbbb")] = [collection(UUID_B, "a/b", REMOTE)]
    s.records[REMOTE] = group(REMOTE, "work on zbbbb", ME)
    s.configs["zbbbb"] = ClusterConfig("{slash}", 500)
    s.shares["zzzzz"] = (
        [group(SHARED, "shared project", OTHER), group(ORPHAN, "orphan", "zzzzz-j7d0g-000000invisible")],
        [{"uuid": OTHER, "first_name": "Other", "last_name": "User"}],
    )
    s.listed[(OTHER, "zzzzz")] = [group(SHARED, "shared project", OTHER)]
    s.tag_heads["demo"] = [UUID_A]
    return s


@pytest.fixture
def tree_of(world, source):
    *_, make = world
    return lambda layout=None: make(layout=layout or Layout(everything=True), projects=source)


async def test_the_root_has_the_whole_tree_and_lists_without_asking(world, tree_of, source):
    tree = tree_of()
    assert await names(tree, ROOT_INODE) == ["README", "by_id", "by_tag", "clusters", "home", "shared"]
    assert await names(tree, await path_node(tree, "clusters")) == ["zzzzz", "zbbbb"]
    assert source.asked == []
    assert b"clusters/<cluster id>/home/" in await read_all(tree, "README")


async def test_names_are_written_as_arv_mount_writes_them_and_the_subproject_wins(world, tree_of):
    fed = world[0]
    tree = tree_of()
    listed = await names(tree, await path_node(tree, "home"))
    assert listed == ["analysis", "loop", "_", "__", "2024%2f03 run", "a_b"]  # "" is not listed
    assert await names(tree, await path_node(tree, "home/analysis")) == ["results"]  # the project
    assert fed.calls == []  # listing a project fetched no manifest


async def test_a_collection_lists_from_its_record_and_loads_when_looked_into(world, tree_of):
    fed = world[0]
    tree = tree_of()
    ino = await path_node(tree, "home/analysis/results")
    attr = await tree.getattr(ino)
    assert attr.is_dir and attr.mtime == 1767323045.0 and fed.calls == []  # 2026-01-02T03:04:05Z
    assert await read_all(tree, "home/analysis/results/hello.txt") == b"hello world\n"
    assert fed.calls == [UUID_A]
    assert (await tree.getattr(ino)).mtime == NOW - 3600  # now the loaded collection's


async def test_a_listed_collection_keeps_its_mtime_not_its_list_record(tree_of, source):
    source.listed[(P1, "zzzzz")][0]["description"] = "d" * 10_000
    tree = tree_of()
    node = tree.node(await path_node(tree, "home/analysis/results"))
    assert not hasattr(node, "__dict__") and not hasattr(node, "record")  # slots: what a million cost
    assert node.attr().mtime == 1767323045.0 and str(node.cid) == UUID_A
    source.listed[(P1, "zzzzz")][0]["modified_at"] = "2026-01-02T03:04:06Z"  # relisted: the new time
    node.relisted(source.listed[(P1, "zzzzz")][0])
    assert node.attr().mtime == 1767323046.0


async def test_a_name_in_a_never_listed_project_is_asked_for_alone_of_its_cluster(world, tree_of, source):
    tree = tree_of()
    path = "clusters/zbbbb/home/work on zbbbb/a{slash}b/remote file.txt"
    assert await read_all(tree, path) == b"from zbbbb\n"
    assert ("contents", ME, "zbbbb") not in source.asked and ("contents", REMOTE, "zbbbb") not in source.asked
    assert ("find", ME, "zbbbb", "work on zbbbb") in source.asked
    assert ("find", REMOTE, "zbbbb", "a{slash}b", "a/b") in source.asked  # zbbbb's substitution


async def test_a_lookup_must_give_back_the_name_looked_up(tree_of):
    tree = tree_of()
    with pytest.raises(FsError) as e:
        await path_node(tree, "home/results")  # in P1, not in home
    assert e.value.errno == errno.ENOENT and e.value.cache_for == 15.0


async def test_a_filter_group_inside_itself_lists_nothing(tree_of):
    tree = tree_of()
    assert await names(tree, await path_node(tree, "home/loop")) == ["loop", "hello"]
    assert await names(tree, await path_node(tree, "home/loop/loop")) == []


async def test_project_record_is_a_hidden_file(tree_of):
    tree = tree_of()
    ino = await path_node(tree, "home/analysis")
    assert ".arvados#project" not in await names(tree, ino)
    assert json.loads(await read_all(tree, "home/analysis/.arvados#project"))["uuid"] == P1


async def test_shared_lists_owners_by_name_and_projects_whose_owner_is_unseen(tree_of):
    tree = tree_of()
    assert await names(tree, await path_node(tree, "shared")) == ["Other User", "orphan"]
    assert await names(tree, await path_node(tree, "shared/Other User")) == ["shared project"]


async def test_a_project_of_any_cluster_opens_by_uuid_under_by_id(tree_of, source):
    tree = tree_of()
    assert await names(tree, await path_node(tree, f"by_id/{REMOTE}")) == ["a{slash}b"]
    assert ("contents", REMOTE, "zbbbb") in source.asked
    assert REMOTE in await names(tree, await path_node(tree, "by_id"))


async def test_listings_are_asked_again_after_refresh_time(world, tree_of, source):
    mono = world[4]
    tree = tree_of()
    home = await path_node(tree, "home")
    await names(tree, home)
    source.listed[(ME, "zzzzz")] = [group(P1, "renamed", ME)]
    mono.t += 10
    assert "analysis" in await names(tree, home)
    mono.t += 6
    assert await names(tree, home) == ["renamed"]
    assert await path_node(tree, "home/renamed") != home


async def test_a_cluster_that_is_down_fails_its_own_directories_alone(world, tree_of, source, caplog):
    tree = tree_of()
    source.down.add("zbbbb")
    with pytest.raises(FsError) as e:
        await names(tree, await path_node(tree, "clusters/zbbbb/shared"))
    assert e.value.errno == errno.EIO and "zbbbb" in str(e.value)
    assert await names(tree, await path_node(tree, "clusters/zzzzz/shared")) == ["Other User", "orphan"]
    source.down.clear()
    assert await names(tree, await path_node(tree, "clusters/zbbbb/shared")) == []  # asked again at once


async def test_a_failed_relisting_keeps_the_last_listing(world, tree_of, source):
    mono = world[4]
    tree = tree_of()
    home = await path_node(tree, "home")
    before = await names(tree, home)
    source.down.add("zzzzz")
    mono.t += 16
    assert await names(tree, home) == before


async def test_by_tag_lists_tagged_collections_by_uuid(tree_of):
    tree = tree_of()
    assert await names(tree, await path_node(tree, "by_tag")) == ["demo"]
    assert await names(tree, await path_node(tree, "by_tag/demo")) == [UUID_A]
    assert await read_all(tree, f"by_tag/demo/{UUID_A}/hello.txt") == b"hello world\n"


@pytest.mark.parametrize(
    ("layout", "first"),
    [
        (Layout(mode="home"), "analysis"),
        (Layout(mode="shared"), "Other User"),
        (Layout(mode="by_tag"), "demo"),
    ],  # fmt: skip
)
async def test_a_single_directory_mode_puts_it_at_the_root(tree_of, layout, first):
    tree = tree_of(layout)
    assert (await names(tree, ROOT_INODE))[0] == first
    assert "stats.json" in await names(tree, await path_node(tree, ".fedmount"))


async def test_a_project_mode_loads_the_project_at_start(tree_of):
    tree = tree_of(Layout(mode="project", project=REMOTE))
    await tree.start()
    assert await names(tree, ROOT_INODE) == ["a{slash}b"]
    bad = tree_of(Layout(mode="project", project=UUID_A))
    with pytest.raises(FsError) as e:
        await bad.start()
    assert e.value.errno == errno.EINVAL


async def test_mount_directories_are_named_as_asked(tree_of):
    tree = tree_of(Layout(by_id=["ids"], home=["mine"], shared=["theirs"], by_tag=["tags"]))
    assert await names(tree, ROOT_INODE) == ["ids", "tags", "mine", "theirs"]


async def test_a_lookup_in_a_stalled_clusters_project_answers_etimedout_at_its_deadline(
    world, source, mock_clock
):
    mock_clock.autojump_threshold = 0.5
    *_, make = world
    tree = make(layout=Layout(everything=True), projects=source, api_wait=5.0)
    release = source.stall["zbbbb"] = trio.Event()
    for path in (f"by_id/{REMOTE}", "clusters/zbbbb/home/work on zbbbb"):
        started = trio.current_time()
        with pytest.raises(FsError) as e:
            await path_node(tree, path)
        assert e.value.errno == errno.ETIMEDOUT and trio.current_time() - started <= 5.0
    assert await names(tree, await path_node(tree, "home")) != []  # another cluster: no wait
    release.set()
    await settle()
    assert await names(tree, await path_node(tree, f"by_id/{REMOTE}")) == ["a{slash}b"]


async def test_a_relisting_keeps_numbers_and_loaded_collections(world, tree_of):
    fed, mono = world[0], world[4]
    tree = tree_of()
    results = await path_node(tree, "home/analysis/results")
    assert await read_all(tree, "home/analysis/results/hello.txt") == b"hello world\n"
    mono.t += 16  # the listing and the collection are due
    assert await names(tree, await path_node(tree, "home/analysis")) == ["results"]
    assert await path_node(tree, "home/analysis/results") == results
    assert await read_all(tree, "home/analysis/results/hello.txt") == b"hello world\n"
    assert fed.calls == [UUID_A]  # loaded once; its re-check asked only for a summary
