"""A mounted collection's lifecycle without a mount: re-checks after refresh_time, signature
refreshes, generations, renumbering what changed, stalled re-checks.
"""

from __future__ import annotations

import errno
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

from fedmount.arvados.errors import ClusterUnreachable
from fedmount.fs.context import Invalidation
from fedmount.fs.errors import FsError


async def test_hidden_collection_record(world):
    fed, *_, make = world
    tree = make()
    coll = await path_node(tree, f"by_id/{UUID_A}")
    assert ".arvados#collection" not in await names(tree, coll)
    record = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert record["manifest_text"] == fed.collections[UUID_A].manifest_text
    attr = await tree.getattr(await path_node(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert attr.attr_timeout == 0 and attr.mode == stat.S_IFREG | 0o444


async def test_block_error_is_eio_and_logged(world, caplog):
    _, reader, stats, *_, make = world
    tree = make()
    handle = await tree.open(await path_node(tree, f"by_id/{UUID_B}/remote file.txt"))
    reader.broken = True
    with caplog.at_level(logging.ERROR, "fedmount.fs"), pytest.raises(FsError) as e:
        await handle.read(0, 10)
    assert e.value.errno == errno.EIO
    [line] = [r.getMessage() for r in caplog.records]
    assert UUID_B in line and "remote file.txt" in line and "zbbbb" in line
    assert stats.get("read_errors", cluster="zbbbb") == 1


async def test_uuid_collection_is_rechecked_after_refresh_time(world):
    fed, _, _, _, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    await tree.getattr(ino)
    assert fed.calls == [UUID_A]
    mono.t += 10
    await tree.getattr(ino)
    assert fed.calls == [UUID_A]  # not due yet
    fed.put(UUID_A, {**FILES_A, "hello.txt": b"hello again, longer\n"})
    mono.t += 6
    assert (await tree.getattr(ino)).size == 12  # the re-check: this number names the old version
    assert fed.calls == [UUID_A, UUID_A]
    new = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    assert new != ino and (await tree.getattr(new)).size == len(b"hello again, longer\n")
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello again, longer\n"


async def test_removed_path_of_changed_uuid_collection_is_enoent(world):
    fed, _, _, _, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin")
    handle = await tree.open(ino)
    fed.put(UUID_A, {"hello.txt": b"hello world\n"})
    mono.t += 16
    with pytest.raises(FsError) as e:
        await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin")
    assert e.value.errno == errno.ENOENT
    assert (await tree.getattr(ino)).size == 2560  # what the handle still open on it reads
    assert await handle.read(0, 4) == bytes(range(4))
    with pytest.raises(FsError) as e:
        await tree.open(ino)
    assert e.value.errno == errno.ESTALE  # the kernel looks the path up again: ENOENT


async def test_changed_uuid_collection_renumbers_what_changed_and_reports_it(world):
    fed, _, _, wall, mono, make = world
    tree = make()
    changes: list[Invalidation] = []
    tree.on_change = changes.append
    hello = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    deep = await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin")
    sub = await path_node(tree, f"by_id/{UUID_A}/dir/sub")
    empty = await path_node(tree, f"by_id/{UUID_A}/dir/empty")
    root = await path_node(tree, f"by_id/{UUID_A}")
    dir_ino = await path_node(tree, f"by_id/{UUID_A}/dir")
    mono.t += 16
    wall.t += 16
    fed.resign()  # same content, new signatures: nothing to forget
    await tree.getattr(hello)
    assert changes == []
    mono.t += 16
    fed.put(UUID_A, {"hello.txt": b"HELLO WORLD\n", "dir/sub/deep.bin": FILES_A["dir/sub/deep.bin"],
                     "dir/empty/now-a-dir.txt": b"x"})
    await tree.getattr(root)
    [change] = changes
    # New blocks, and a file that became a directory: the kernel must look these names up again.
    assert sorted(change.entries) == sorted([(root, "hello.txt"), (dir_ino, "empty")])
    assert set(change.attrs) == {root, dir_ino, sub}  # the directories the kernel looked into
    new_hello = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    assert new_hello != hello and await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"HELLO WORLD\n"
    new_empty = await path_node(tree, f"by_id/{UUID_A}/dir/empty")
    assert new_empty != empty and await names(tree, new_empty) == ["now-a-dir.txt"]
    assert await path_node(tree, f"by_id/{UUID_A}/dir/sub/deep.bin") == deep  # same blocks, same number
    for old in (hello, empty):
        with pytest.raises(FsError) as e:
            await tree.open(old)
        assert e.value.errno == errno.ESTALE


async def test_a_number_names_one_content_across_updates(world):
    """An old handle reads only its version, a new open only the current one, and the
    attributes of each number stay those of its version (the kernel's pages and attributes
    of an inode are never of two versions)."""
    fed, _, _, _, mono, make = world
    tree = make()
    versions = [b"version %d of the same size\n" % i for i in range(4)]
    fed.put(UUID_A, {"data.bin": versions[0]})
    handles, numbers = [], []
    for i, version in enumerate(versions):
        if i:
            fed.put(UUID_A, {"data.bin": version})
            fed.collections[UUID_A].modified_at = NOW + i
            mono.t += 16
        ino = await path_node(tree, f"by_id/{UUID_A}/data.bin")
        numbers.append(ino)
        handles.append(await tree.open(ino))
        for j, handle in enumerate(handles):
            assert await handle.read(0, 100) == versions[j]
            attr = await tree.getattr(numbers[j])
            assert attr.size == len(versions[j]) and attr.mtime == (NOW - 3600 if j == 0 else NOW + j)
    assert len(set(numbers)) == len(versions)
    for old in numbers[:-1]:
        with pytest.raises(FsError) as e:
            await tree.open(old)
        assert e.value.errno == errno.ESTALE


@pytest.mark.parametrize("operation", ["open", "getattr"])
async def test_an_operation_on_a_number_its_own_recheck_retires_is_of_the_old_version(world, operation):
    """The kernel asks about a number it still holds; the operation's own re-check changes the file."""
    fed, _, _, _, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    fed.put(UUID_A, {**FILES_A, "hello.txt": b"HELLO, WORLD, A LONGER ONE\n"})
    mono.t += 16
    if operation == "getattr":
        assert (await tree.getattr(ino)).size == 12  # the attributes of the version it named
    else:
        with pytest.raises(FsError) as e:
            await tree.open(ino)
        assert e.value.errno == errno.ESTALE  # the kernel looks the path up again
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"HELLO, WORLD, A LONGER ONE\n"


async def test_pdh_collection_is_never_rechecked_before_signatures_age(world):
    fed, _, _, wall, mono, make = world
    tree = make()
    pdh = fed.collections[UUID_A].portable_data_hash
    ino = await path_node(tree, f"by_id/{pdh}/hello.txt")
    mono.t += 86400
    wall.t += 86400
    await tree.getattr(ino)
    assert fed.calls == [pdh]


async def test_signatures_are_refreshed_and_open_files_keep_reading(world):
    fed, reader, _, wall, _, make = world
    fed.signature_ttl = 1000
    fed.put(UUID_A, FILES_A)
    tree = make()
    pdh = fed.collections[UUID_A].portable_data_hash
    handle = await tree.open(await path_node(tree, f"by_id/{pdh}/dir/sub/deep.bin"))
    assert await handle.read(0, 4) == bytes(range(4))
    old = reader.opened[-1]
    assert "@" in old.locators[0]
    wall.t += 400  # before half the time left: nothing
    await handle.read(0, 4)
    assert fed.calls == [pdh]
    wall.t += 200  # past half: the next touch re-fetches and re-signs
    fed.resign()
    assert await handle.read(4, 4) == bytes(range(4, 8))
    assert fed.calls == [pdh, pdh]
    new = reader.opened[-1]
    assert new is not old and old.closed and new.locators != old.locators
    assert new.locators[0].split("+A")[0] == old.locators[0].split("+A")[0]


async def test_failed_refresh_keeps_serving(world, caplog):
    fed, _, _, _, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    fed.fail[UUID_A] = ClusterUnreachable("zzzzz", "connection refused")
    mono.t += 16
    with caplog.at_level(logging.ERROR, "fedmount.fs"):
        assert (await tree.getattr(ino)).size == 12
    assert any(UUID_A in r.getMessage() for r in caplog.records)
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello world\n"


async def test_a_stalled_recheck_serves_the_current_generation_and_reads_never_wait(
    world, stalled, mock_clock
):
    fed, _, stats, _, mono, make = world
    tree = make(api_wait=5.0)
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    handle = await tree.open(ino)
    release = stalled(UUID_A)
    fed.put(UUID_A, {**FILES_A, "hello.txt": b"hello again, longer\n"})
    mono.t += 16
    started = trio.current_time()
    assert await handle.read(0, 100) == b"hello world\n"  # starts the re-check, does not wait for it
    assert trio.current_time() == started
    assert (await tree.getattr(ino)).size == 12  # waits until the re-check's deadline, then serves
    assert trio.current_time() - started == 5.0
    for _ in range(3):  # past the deadline: no more waiting, whatever the operation
        assert (await tree.getattr(ino)).size == 12
        assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello world\n"
    assert trio.current_time() - started == 5.0
    assert stats.get("api_calls_late", op="recheck", cluster="zzzzz") == 1
    release.set()
    await settle()
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello again, longer\n"
    assert await handle.read(0, 100) == b"hello world\n"  # the handle keeps its snapshot


async def test_a_recheck_that_answers_within_its_deadline_is_waited_for(world):
    fed, _, _, _, mono, make = world
    tree = make(api_wait=5.0)
    await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    fed.put(UUID_A, {**FILES_A, "hello.txt": b"hello again, longer\n"})
    mono.t += 16
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello again, longer\n"
