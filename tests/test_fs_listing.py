"""Inode numbering without a mount: listings that keep nothing per entry, the inode table,
the negative cache.
"""

from __future__ import annotations

import errno
import gc
import tracemalloc
from dataclasses import dataclass

from fsworld import (  # tests/ is on sys.path under pytest
    UUID_A,
    Clock,
    path_node,
    world_fixture,  # noqa: F401 (a fixture)
)

from fedmount.fs.errors import FsError
from fedmount.fs.inodes import ROOT_INODE, InodeTable, NegativeCache


async def test_a_listing_begun_before_a_refresh_gives_current_attributes(world):
    fed, _, _, _, mono, make = world
    tree = make()
    root = await path_node(tree, f"by_id/{UUID_A}")
    entries = await tree.listdir(root)
    fed.put(UUID_A, {"dir/x": b"1", "other.txt": b"abcd"})
    mono.t += 16
    await tree.getattr(root)  # the refresh
    attrs = {}
    for i in range(len(entries)):
        name, node = entries[i]
        try:
            attrs[name] = node.attr().size
        except FsError as e:
            attrs[name] = e.errno
    assert attrs == {"dir": 0, "hello.txt": errno.ENOENT}  # the adapter's readdir skips the gone one


async def test_listing_a_large_collection_keeps_nothing_per_entry(world):
    fed, _, _, _, _, make = world
    streams = [f"./d{d} {'acbd18db4cc2f85cedef654fccc4a4d8+3'} " + " ".join(f"0:3:f{i}" for i in range(5000))
               for d in range(4)]
    fed.put("zzzzz-4zz18-largelargelarge", {}, text="\n".join(streams) + "\n")
    tree = make()
    root = await path_node(tree, "by_id/zzzzz-4zz18-largelargelarge")
    seen: dict[str, int] = {}

    async def walk(ino: int, prefix: str, record: bool) -> None:
        entries = await tree.listdir(ino)
        for i in range(len(entries)):
            name, node = entries[i]
            assert (await tree.lookup(ino, name)).ino == node.ino == node.attr().ino
            if record:
                seen[prefix + name] = node.ino
            if node.is_dir:
                await walk(node.ino, prefix + name + "/", record)

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await walk(root, "", False)  # the first walk numbers every entry
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    await walk(root, "", True)
    assert len(seen) == 20_004 and len(set(seen.values())) == 20_004
    assert grown < 20_000  # bytes, for 20,004 entries: no object, dict slot or cached attribute each
    assert (await tree.getattr(seen["d3/f4999"])).size == 3  # a number resolves without its lookup
    assert tree.statfs()["f_files"] >= 20_004


def test_inode_table_keys_are_stable_and_never_reused():
    table: InodeTable[str] = InodeTable()
    a = table.number(("c", "a"))
    b = table.number(("c", "b"))
    assert a != b and table.number(("c", "a")) == a and ROOT_INODE not in (a, b)
    table.bind(a, "node-a")
    table.bind(a, "node-a2")
    assert table.get(a) == "node-a2" and table.get(b) is None


def test_inode_ranges_resolve_through_their_owner_between_keyed_numbers():
    @dataclass
    class Owner:
        tag: str
        start: int = 0

        def node_at(self, ino: int) -> str:
            return f"{self.tag}{ino - self.start}"

    table: InodeTable[str] = InodeTable()
    first, second, empty = Owner("x"), Owner("y"), Owner("z")
    first.start = table.allocate(3, first)
    single = table.number("single")
    table.bind(single, "s")
    empty.start = table.allocate(0, empty)
    second.start = table.allocate(2, second)
    assert [table.get(first.start + i) for i in range(3)] == ["x0", "x1", "x2"]
    assert table.get(single) == "s" and single == first.start + 3
    assert [table.get(second.start + i) for i in range(2)] == ["y0", "y1"]
    assert table.get(second.start + 2) is None and table.get(ROOT_INODE) is None
    assert len(table) == 6


def test_negative_cache_expires_and_is_bounded():
    clock = Clock(0.0)
    cache = NegativeCache(10, clock, limit=2)
    cache.add("x")
    assert "x" in cache
    clock.t = 11
    assert "x" not in cache
    for name in ("a", "b", "c"):
        cache.add(name)
    assert "c" in cache and "a" not in cache
