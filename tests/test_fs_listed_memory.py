"""What a listed project entry costs in memory (issue 17): bytes kept per entry after an
``ls -l`` of a project of collections, and the peak while listing it (one page of decoded
records at a time, not the whole listing's)."""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

import trio

from fedmount.api.listing import ClusterConfig, Take
from fedmount.fs.layout import Layout
from fedmount.fs.tree import Tree
from fedmount.stats import Stats

ME = "zzzzz-tpzed-000000000000001"
PROJECT = "zzzzz-j7d0g-000000000000001"
PAGES, PAGE = 8, 1000
STAMP = "2026-01-02T03:04:05.123456789Z"


def record(i: int) -> dict[str, Any]:
    """A collection as ``groups/<uuid>/contents`` answers fedmount's select."""
    uuid = f"zzzzz-4zz18-{i:015d}"
    return {"kind": "arvados#collection", "etag": f"{i:024x}", "uuid": uuid, "name": f"sample {i:06d}.fastq",
            "modified_at": STAMP, "current_version_uuid": uuid}  # fmt: skip


class PagedSource:
    """Home holds one project of `pages` pages of collections, each page decoded from JSON text
    as the controller client decodes it (no string shared between records)."""

    home_cluster = "zzzzz"
    clusters = ["zzzzz"]
    user = {"uuid": ME, "first_name": "Me", "last_name": "Me"}
    pages = PAGES

    async def config(self, cluster: str) -> ClusterConfig:
        return ClusterConfig("%2f", PAGE)

    async def contents(self, owner: str, take: Take, cluster: str | None = None) -> None:
        if owner == ME:
            await take([{"uuid": PROJECT, "name": "big", "owner_uuid": ME, "group_class": "project"}])
            return
        for page in range(self.pages):
            await take(json.loads(body(page)))


def body(page: int) -> bytes:
    return json.dumps([record(page * PAGE + i) for i in range(PAGE)]).encode()


class NoFederation:
    async def get_collection(self, cid: Any) -> Any:
        raise AssertionError("listing a project loads no collection")

    async def get_summary(self, cid: Any, fields: Any) -> Any:
        raise AssertionError("listing a project re-checks no collection")


async def ls_l(tree: Tree, ino: int) -> int:
    """readdir (the attributes of each entry), then a lookup and getattr of each, as ``ls -l``."""
    entries = await tree.listdir(ino)
    for index in range(len(entries)):
        name, node = entries[index]
        node.attr()
        await tree.getattr((await tree.lookup(ino, name)).ino)
    return len(entries)


async def test_a_listed_entry_keeps_a_few_hundred_bytes_and_a_listing_one_page_of_records():
    tree = Tree(NoFederation(), None, stats=Stats(), layout=Layout(home=["home"]),  # type: ignore[arg-type]
                projects=PagedSource())  # fmt: skip
    async with trio.open_nursery() as nursery:
        tree.calls.nursery = nursery
        home = await tree.lookup(1, "home")
        await ls_l(tree, home.ino)  # listed first, as the bench does: its own cost is not counted
        project = await tree.lookup(home.ino, "big")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            entries = await ls_l(tree, project.ino)
            gc.collect()
            _, peak = tracemalloc.get_traced_memory()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    kept = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert entries == PAGES * PAGE
    # Measured 340 B: the name and uuid, the node, its number and mtime, two dict slots and a
    # list slot. Keeping the list records, or (directory, uuid) key tuples (+86 B), or the
    # inode table's dict entry as well (+29 B), would break it.
    assert kept / entries < 365
    # All 8,000 records alive at once peak at about 950 B per entry (measured); one page at
    # a time at what is kept plus one page's records, text and body (measured 525 B).
    assert (peak - base) / entries < 750


async def test_listed_collections_are_numbered_by_page_ranges_that_find_their_nodes():
    source = PagedSource()
    clock = [0.0]
    tree = Tree(NoFederation(), None, stats=Stats(), layout=Layout(home=["home"]),  # type: ignore[arg-type]
                projects=source, clock=lambda: clock[0])  # fmt: skip
    async with trio.open_nursery() as nursery:
        tree.calls.nursery = nursery
        home = await tree.lookup(1, "home")
        await tree.listdir(home.ino)
        project = await tree.lookup(home.ino, "big")
        first = dict(await tree.listdir(project.ino))
        clock[0] += 60  # past refresh_time: listed again, with one page more
        source.pages += 1
        second = dict(await tree.listdir(project.ino))
        nursery.cancel_scope.cancel()
    assert len(first) == PAGES * PAGE and len(second) == (PAGES + 1) * PAGE
    assert all(second[name] is node for name, node in first.items())  # same nodes, same numbers
    numbers = {node.ino for node in second.values()}
    assert len(numbers) == len(second) and min(numbers) > project.ino
    assert all(tree.node(node.ino) is node for node in second.values())
