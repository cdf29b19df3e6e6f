"""Loading and re-checking collections without a mount: what is asked of the API, what is
kept of a record, and failures as errnos with one log line.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging

import pytest
from fsworld import (  # tests/ is on sys.path under pytest
    NOW,
    UUID_A,
    UUID_B,
    path_node,
    read_all,
    world_fixture,  # noqa: F401 (a fixture)
)

from fedmount.arvados.errors import AccessDenied, ClusterUnreachable, refusal
from fedmount.fs.errors import FsError


async def test_a_mounted_collection_keeps_its_record_only_compressed(world):
    fed, *_, make = world
    description = "a long description " * 50_000  # about 1 MB
    fed.collections[UUID_A].answer["description"] = description
    tree = make()
    await path_node(tree, f"by_id/{UUID_A}")
    coll = tree.root.children["by_id"]._collections[UUID_A]
    text = fed.collections[UUID_A].manifest_text
    kept = [getattr(coll.record, f.name) for f in dataclasses.fields(coll.record)]
    assert text not in kept and description not in kept
    assert len(coll.record.packed_fields) < 20_000
    assert coll.record.answer() == fed.collections[UUID_A].answer
    assert coll.record.field_names == ("uuid", "portable_data_hash", "name", "description")


async def test_free_heap_is_released_after_every_fetch(world, monkeypatch):
    fed, _, _, _, mono, make = world
    released: list[int] = []
    monkeypatch.setattr("fedmount.fs.loader.release", lambda: released.append(len(fed.calls + fed.summaries)))
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    assert released == [1]
    mono.t += 16
    await tree.getattr(ino)  # an unchanged re-check
    fed.fail[UUID_A] = ClusterUnreachable("zzzzz", "connection refused")
    mono.t += 16
    await tree.getattr(ino)  # a failed one
    assert released == [1, 2, 3]


async def test_an_unchanged_recheck_asks_only_for_what_decides_freshness(world, monkeypatch):
    fed, _, _, _, mono, make = world
    fed.collections[UUID_A].answer["description"] = "d" * 100_000  # re-downloaded every time, before
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    record_before = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    parsed: list[str] = []
    monkeypatch.setattr("fedmount.fs.loader.parse_manifest", lambda text: parsed.append(text))
    for _ in range(3):
        mono.t += 16
        assert (await tree.getattr(ino)).size == 12
    assert fed.calls == [UUID_A] and parsed == []  # the whole record was fetched once, at lookup
    assert fed.summaries == [(UUID_A, ["modified_at", "portable_data_hash", "uuid"])] * 3
    assert json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection")) == record_before


async def test_a_record_change_without_new_content_fetches_its_fields_not_its_manifest(world, monkeypatch):
    fed, _, _, _, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    record_before = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    parsed: list[str] = []
    monkeypatch.setattr("fedmount.fs.loader.parse_manifest", lambda text: parsed.append(text))
    rec = fed.collections[UUID_A]
    rec.answer["name"], rec.modified_at = "renamed", NOW  # the record changed, not its content
    mono.t += 16
    assert (await tree.getattr(ino)).mtime == NOW
    assert fed.calls == [UUID_A] and parsed == []
    assert fed.summaries == [(UUID_A, ["modified_at", "portable_data_hash", "uuid"]),
                             (UUID_A, ["name", "portable_data_hash", "uuid"])]  # fmt: skip
    record = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert record == {**record_before, "name": "renamed"}  # with the manifest text it had


async def test_a_recheck_that_finds_a_new_pdh_fetches_the_whole_record(world):
    fed, _, _, _, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    new = fed.put(UUID_A, {"hello.txt": b"hello, world!\n"})
    mono.t += 16
    await tree.getattr(ino)
    assert (await tree.getattr(await path_node(tree, f"by_id/{UUID_A}/hello.txt"))).size == 14
    assert [cid for cid, _ in fed.summaries] == [UUID_A] and fed.calls == [UUID_A, UUID_A]
    record = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert record["portable_data_hash"] == new.portable_data_hash
    assert record["manifest_text"] == new.manifest_text


async def test_a_signature_refresh_fetches_the_whole_record_without_asking_for_a_summary(world):
    fed, _, _, wall, mono, make = world
    tree = make()
    ino = await path_node(tree, f"by_id/{UUID_A}/hello.txt")
    fed.resign()
    wall.t += fed.signature_ttl * 0.6  # past the half-life of the signatures
    mono.t += 1
    await tree.getattr(ino)
    assert fed.summaries == [] and fed.calls == [UUID_A, UUID_A]
    record = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert "+A" + "b" * 40 in record["manifest_text"]  # the freshly signed text


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (AccessDenied("zbbbb", "token expired", 401), errno.EACCES),
        (AccessDenied("zbbbb", "forbidden", 403), errno.EACCES),
        (ClusterUnreachable("zbbbb", "connection refused"), errno.EIO),
        (refusal("zbbbb", "bad gateway", 502), errno.EIO),
    ],
)
async def test_api_errors_map_to_errnos_and_one_log_line(world, caplog, error, code):
    fed, *_, make = world
    tree = make()
    fed.fail[UUID_B] = error
    with caplog.at_level(logging.ERROR, "fedmount.fs"), pytest.raises(FsError) as e:
        await path_node(tree, f"by_id/{UUID_B}")
    assert e.value.errno == code and e.value.cache_for == 0
    [line] = [r.getMessage() for r in caplog.records]
    assert UUID_B in line and "zbbbb" in line and "\n" not in line
    assert await read_all(tree, f"by_id/{UUID_A}/hello.txt") == b"hello world\n"  # the rest still works


async def test_malformed_manifest_is_eio_naming_collection_and_cluster(world, caplog):
    fed, *_, make = world
    fed.put("zcccc-4zz18-ccccccccccccccc", {}, text=". not-a-locator 0:1:x\n")
    tree = make()
    with caplog.at_level(logging.ERROR, "fedmount.fs"), pytest.raises(FsError) as e:
        await path_node(tree, "by_id/zcccc-4zz18-ccccccccccccccc")
    assert e.value.errno == errno.EIO
    [line] = [r.getMessage() for r in caplog.records]
    assert "zcccc-4zz18-ccccccccccccccc" in line and "cluster zcccc" in line and "line 1" in line
