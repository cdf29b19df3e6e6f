"""The filesystem model's operations and layout without a mount: the root, by_id/ and by_pdh/
lookups, attributes, xattrs, statfs, negative answers, lookups that wait on a stalled API.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import stat

import pytest
import trio
import trio.testing
from fsworld import (  # tests/ is on sys.path under pytest
    FILES_A,
    NOW,
    UUID_A,
    UUID_B,
    names,
    path_node,
    read_all,
    settle,
    stalled_fixture,  # noqa: F401 (a fixture)
    world_fixture,  # noqa: F401 (a fixture)
)

from fedmount.arvados.ids import parse_collection_id
from fedmount.fs.errors import FsError
from fedmount.fs.inodes import ROOT_INODE
from fedmount.fs.layout import Layout
from fedmount.fs.nodes import FOREVER


async def test_root_lists_readme_and_by_id_and_hides_stats(world):
    fed, reader, stats, *_, make = world
    tree = make()
    assert await names(tree, ROOT_INODE) == ["README", "by_id"]
    assert b"by_id" in await read_all(tree, "README")
    stats.add("keep_bytes", 42, cluster="zbbbb")
    snapshot = json.loads(await read_all(tree, ".fedmount/stats.json"))
    assert snapshot["keep_bytes"] == {"cluster=zbbbb": 42}
    assert fed.calls == []


async def test_by_id_readme_appears_only_when_ready(world):
    *_, make = world
    tree = make()
    by_id = await path_node(tree, "by_id")
    with pytest.raises(FsError) as e:
        await tree.lookup(by_id, "README")
    assert e.value.errno == errno.ENOENT and e.value.cache_for == 0  # the kernel must ask again
    assert await names(tree, by_id) == []
    tree.ready = True
    assert b"portable data hash" in await read_all(tree, "by_id/README")
    assert await names(tree, by_id) == ["README"]


async def test_uuid_and_pdh_of_any_cluster_resolve_and_list(world):
    fed, *_, make = world
    tree = make()
    assert await read_all(tree, f"by_id/{UUID_B}/remote file.txt") == b"from zbbbb\n"
    pdh = fed.collections[UUID_A].portable_data_hash
    assert await read_all(tree, f"by_id/{pdh}/dir/sub/deep.bin") == FILES_A["dir/sub/deep.bin"]
    assert await names(tree, await path_node(tree, "by_id")) == [UUID_B, pdh]
    assert sorted(await names(tree, await path_node(tree, f"by_id/{pdh}"))) == ["dir", "hello.txt"]
    assert await names(tree, await path_node(tree, f"by_id/{pdh}/dir")) == ["sub", "empty"]


async def test_attributes_modes_sizes_times_and_stable_inodes(world):
    fed, *_, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin")
    attr = await tree.getattr(ino)
    assert attr.mode == stat.S_IFREG | 0o555 and attr.size == 2560 and attr.blocks == 5
    assert attr.mtime == NOW - 3600
    assert attr.attr_timeout == attr.entry_timeout == 15.0  # UUID: re-checked
    d = await tree.getattr(await path_node(tree, f"by_id/{UUID_A}/dir"))
    assert d.mode == stat.S_IFDIR | 0o555
    assert await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin") == ino
    empty = await tree.getattr(await path_node(tree, f"by_id/{UUID_A}/dir/empty"))
    assert empty.size == 0 and await read_all(tree, f"by_id/{UUID_A}/dir/empty") == b""
    pdh = fed.collections[UUID_A].portable_data_hash
    p = await tree.getattr(await path_node(tree, f"by_id/{pdh}/hello.txt"))
    assert p.attr_timeout == p.entry_timeout == FOREVER and p.ino != ino


async def test_names_are_decoded_from_the_manifest(world):
    *_, make = world
    tree = make()
    assert "remote file.txt" in await names(tree, await path_node(tree, f"by_id/{UUID_B}"))


async def test_names_that_cannot_be_ids_never_reach_the_api(world):
    fed, _, stats, *_, make = world
    tree = make()
    by_id = await path_node(tree, "by_id")
    bare_hash = "d41d8cd98f00b204e9800998ecf8427e"
    for name in ("not-a-thing", "zzzzz-tpzed-aaaaaaaaaaaaaaa", "0123", ".hidden", bare_hash):
        with pytest.raises(FsError) as e:
            await tree.lookup(by_id, name)
        assert e.value.errno == errno.ENOENT and e.value.cache_for > 0
    assert fed.calls == []
    assert stats.get("lookups_refused_locally") == 5


async def test_unknown_collection_is_cached_negatively_for_a_while(world):
    fed, _, _, _, mono, make = world
    tree = make()
    by_id = await path_node(tree, "by_id")
    missing = "zbbbb-4zz18-000000000000000"
    for _ in range(3):
        with pytest.raises(FsError) as e:
            await tree.lookup(by_id, missing)
        assert e.value.errno == errno.ENOENT and e.value.cache_for == 15.0
    assert fed.calls == [missing]
    mono.t += 16
    fed.put(missing, {"new": b"now it exists"})
    assert await read_all(tree, f"by_id/{missing}/new") == b"now it exists"


async def test_by_pdh_refuses_uuids_without_asking(world):
    fed, *_, make = world
    tree = make(layout=Layout(by_id=["by_uuid"], by_pdh=["by_id"]))
    assert await names(tree, ROOT_INODE) == ["by_uuid", "by_id"]
    with pytest.raises(FsError) as e:
        await path_node(tree, f"by_id/{UUID_A}")
    assert e.value.errno == errno.ENOENT and fed.calls == []
    pdh = fed.collections[UUID_A].portable_data_hash
    assert await read_all(tree, f"by_id/{pdh}/hello.txt") == b"hello world\n"
    assert await read_all(tree, f"by_uuid/{UUID_A}/hello.txt") == b"hello world\n"


async def test_collection_layout_puts_one_collection_at_the_root(world):
    fed, *_, make = world
    tree = make(layout=Layout(collection=UUID_B))
    await tree.start()
    assert await names(tree, ROOT_INODE) == ["remote file.txt"]
    assert await read_all(tree, "remote file.txt") == b"from zbbbb\n"
    assert json.loads(await read_all(tree, ".arvados#collection"))["uuid"] == UUID_B
    assert "stats.json" in await names(tree, await path_node(tree, ".fedmount"))


async def test_collection_layout_of_a_missing_collection_fails_to_start(world, caplog):
    *_, make = world
    tree = make(layout=Layout(collection="zbbbb-4zz18-000000000000000"))
    with caplog.at_level(logging.DEBUG, "fedmount"), pytest.raises(FsError) as e:
        await tree.start()
    assert e.value.errno == errno.ENOENT and "zbbbb-4zz18-000000000000000" in str(e.value)
    # The start-up error is printed once by the caller (fedmount --collection), not logged too.
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    with caplog.at_level(logging.INFO, "fedmount"), pytest.raises(FsError):  # later failures do log
        await tree.loader.load(parse_collection_id("zbbbb-4zz18-000000000000000"))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [str(e.value)]


async def test_pdh_and_uuid_files_open_with_keep_cache(world):
    fed, *_, make = world
    tree = make()
    pdh = fed.collections[UUID_A].portable_data_hash
    assert (await tree.open(await path_node(tree, f"by_id/{pdh}/hello.txt"))).keep_cache
    assert (await tree.open(await path_node(tree, f"by_id/{UUID_A}/hello.txt"))).keep_cache
    with pytest.raises(FsError) as e:
        await tree.open(await path_node(tree, f"by_id/{pdh}/dir"))
    assert e.value.errno == errno.EISDIR


async def test_xattrs_name_collection_cluster_locators_and_cached_bytes(world):
    fed, *_, make = world
    deep = FILES_A["dir/sub/deep.bin"]
    key = f"{hashlib.md5(deep).hexdigest()}+{len(deep)}"
    tree = make(cached_bytes=lambda k: len(deep) if k == key else 0)
    ino = await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin")
    assert set(tree.listxattr(ino)) == {
        "user.arvados.uuid", "user.arvados.portable_data_hash", "user.arvados.cluster",
        "user.arvados.locators", "user.arvados.cached_bytes",
    }  # fmt: skip
    assert tree.getxattr(ino, "user.arvados.uuid") == UUID_A.encode()
    pdh = fed.collections[UUID_A].portable_data_hash
    assert tree.getxattr(ino, "user.arvados.portable_data_hash") == pdh.encode()
    assert tree.getxattr(ino, "user.arvados.cluster") == b"zzzzz"
    assert tree.getxattr(ino, "user.arvados.locators") == key.encode()  # no signature
    assert tree.getxattr(ino, "user.arvados.cached_bytes") == b"2560"
    hello = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    assert tree.getxattr(hello, "user.arvados.cached_bytes") == b"0"
    d = await path_node(tree, f"by_id/{UUID_B}")
    assert tree.getxattr(d, "user.arvados.cluster") == b"zbbbb"
    with pytest.raises(FsError) as e:
        tree.getxattr(d, "user.arvados.nope")
    assert e.value.errno == errno.ENODATA
    assert tree.listxattr(ROOT_INODE) == []


async def test_statfs_reports_cache_and_files(world):
    *_, make = world
    tree = make(cache_usage=lambda: (1 << 30, 1 << 28))
    await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    s = tree.statfs()
    assert s["f_bsize"] * s["f_blocks"] == 1 << 30
    assert s["f_bsize"] * s["f_bavail"] == 3 << 28
    assert s["f_files"] >= 5 and s["f_namemax"] == 255


async def test_statfs_always_reports_free_inodes(world):
    *_, make = world
    tree = make(cache_usage=lambda: (1 << 30, 1 << 28))
    await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    s = tree.statfs()
    used = s["f_files"] - s["f_ffree"]
    assert used >= 5 and s["f_ffree"] == s["f_favail"] >= 1 << 30  # df -i: under 1% in use
    assert s["f_files"] < 1 << 32  # a 32-bit statfs caller gets no EOVERFLOW


async def test_concurrent_lookups_of_one_collection_make_one_call(world):
    fed, *_, make = world
    tree = make()
    by_id = await path_node(tree, "by_id")
    inos = []

    async def look() -> None:
        inos.append((await tree.lookup(by_id, UUID_B)).ino)

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(look)
    assert fed.calls == [UUID_B] and len(set(inos)) == 1


async def test_every_spelling_of_a_pdh_is_one_collection(world):
    fed, *_, make = world
    tree = make()
    pdh = fed.collections[UUID_A].portable_data_hash
    digest, size = pdh.split("+")
    spellings = [pdh, f"{pdh}+Kzbbbb", f"{digest}+000{size}", f"{pdh}+Afoo@12345678+Zbar"]
    roots = {await path_node(tree, f"by_id/{name}") for name in spellings}
    assert len(roots) == 1 and fed.calls == [pdh]
    assert await names(tree, await path_node(tree, "by_id")) == [pdh]
    missing = "0" * 32 + "+7"
    for name in (missing, missing + "+Kx", "0" * 32 + "+07"):
        with pytest.raises(FsError) as e:
            await path_node(tree, f"by_id/{name}")
        assert e.value.errno == errno.ENOENT
    assert fed.calls == [pdh, missing]  # one negative answer for every spelling


async def test_a_stalled_lookup_answers_etimedout_at_its_deadline_and_a_later_lookup_gets_it(
    world, stalled, mock_clock
):
    fed, _, stats, *_, make = world
    tree = make(api_wait=5.0)
    release = stalled(UUID_B)
    by_id = await path_node(tree, "by_id")
    started = trio.current_time()
    with pytest.raises(FsError) as e:
        await tree.lookup(by_id, UUID_B)
    assert e.value.errno == errno.ETIMEDOUT and trio.current_time() - started == 5.0
    said = f"collection {UUID_B}: no answer from the API within 5s; still asking, for the next lookup"
    assert str(e.value) == said
    release.set()
    await settle()  # the call ends in the background
    assert await read_all(tree, f"by_id/{UUID_B}/remote file.txt") == b"from zbbbb\n"
    assert fed.calls == [UUID_B]  # one API call for both lookups
    assert stats.get("api_calls_late", op="lookup", cluster="zbbbb") == 1


async def test_a_stalled_cluster_costs_one_wait_not_one_per_id_and_nothing_to_others(
    world, stalled, mock_clock
):
    fed, *_, make = world
    other_b = "zbbbb-4zz18-ccccccccccccccc"
    fed.put(other_b, {"x": b"x"})
    tree = make(api_wait=5.0)
    for cid in (UUID_B, other_b):
        stalled(cid)
    by_id = await path_node(tree, "by_id")
    waited, said = [], []
    for cid in (UUID_B, other_b, UUID_B):
        started = trio.current_time()
        with pytest.raises(FsError) as e:
            await tree.lookup(by_id, cid)
        assert e.value.errno == errno.ETIMEDOUT
        waited.append(trio.current_time() - started)
        said.append(str(e.value))
    assert waited == [5.0, 0.0, 0.0]  # zbbbb is stalled: its ids answer at once
    assert "yet (zbbbb has requests pending past 5s)" in said[1]
    started = trio.current_time()
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello world\n"
    assert trio.current_time() == started  # another cluster's collection: no wait at all
