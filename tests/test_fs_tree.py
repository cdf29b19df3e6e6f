"""The filesystem model without a mount: layout, attributes, freshness, errors.

The federation and the block reader are small fakes of their interfaces
(`Federation.get_collection`, `BlockReader.open` -> `FileReader.read/close`); manifests are
parsed by the real parser.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import logging
import re
import stat
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from fedmount.api.federation import CollectionSummary
from fedmount.arvados.errors import AccessDenied, BlockError, ClusterUnreachable, NotFound, refusal
from fedmount.arvados.ids import CollectionId, parse_collection_id, parse_locator
from fedmount.arvados.manifest import File, portable_data_hash
from fedmount.arvados.routes import KeepRoute
from fedmount.fs.context import Invalidation
from fedmount.fs.errors import FsError
from fedmount.fs.inodes import ROOT_INODE, InodeTable, NegativeCache
from fedmount.fs.layout import Layout
from fedmount.fs.nodes import FOREVER
from fedmount.fs.tree import Tree
from fedmount.stats import Stats

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Record:
    uuid: str
    portable_data_hash: str
    manifest_text: str
    modified_at: float | None
    cluster: str
    answer: dict[str, Any]
    route: KeepRoute


def block_token(data: bytes, expiry: float | None) -> str:
    loc = f"{hashlib.md5(data).hexdigest()}+{len(data)}"
    return loc if expiry is None else f"{loc}+A{'a' * 40}@{int(expiry):08x}"


def manifest_of(files: dict[str, bytes], expiry: float | None) -> tuple[str, dict[str, bytes]]:
    """One stream per directory, one block per file; returns text and the blocks by key."""
    by_dir: dict[str, list[tuple[str, bytes]]] = {}
    for path, data in files.items():
        d, _, name = path.rpartition("/")
        by_dir.setdefault(d, []).append((name, data))
    lines, blocks = [], {}
    for d, entries in sorted(by_dir.items()):
        tokens, segs, pos = [], [], 0
        for name, data in entries:
            if data:
                tokens.append(block_token(data, expiry))
                blocks[f"{hashlib.md5(data).hexdigest()}+{len(data)}"] = data
            segs.append(f"{pos}:{len(data)}:{name.replace(' ', chr(92) + '040')}")
            pos += len(data)
        tokens = tokens or ["d41d8cd98f00b204e9800998ecf8427e+0"]
        lines.append(" ".join([f"./{d}" if d else ".", *tokens, *segs]))
    return "".join(line + "\n" for line in lines), blocks


@dataclass
class FakeFederation:
    """`Federation.get_collection` over a dict; counts calls; can fail or stall on demand
    (a stalled id's calls wait until its event is set)."""

    wall: Clock
    collections: dict[str, Record] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # get_collection: whole records
    summaries: list[tuple[str, list[str]]] = field(default_factory=list)  # get_summary: (id, fields)
    fail: dict[str, Exception] = field(default_factory=dict)
    stall: dict[str, trio.Event] = field(default_factory=dict)
    blocks: dict[str, bytes] = field(default_factory=dict)
    signature_ttl: float = 14 * 86400

    def put(self, uuid: str, files: dict[str, bytes], cluster: str | None = None,
            text: str | None = None) -> Record:
        expiry = self.wall() + self.signature_ttl
        made, blocks = manifest_of(files, expiry)
        text = made if text is None else text
        self.blocks.update(blocks)
        cluster = cluster or uuid[:5]
        pdh = portable_data_hash(text)
        route = KeepRoute(cluster, "token", ())
        fields = {"uuid": uuid, "portable_data_hash": pdh, "name": "a collection", "manifest_text": text}
        rec = Record(uuid, pdh, text, NOW - 3600, cluster, fields, route)
        self.collections[uuid] = rec
        self.collections[pdh] = Record(pdh, pdh, text, None, cluster, {"uuid": pdh}, route)
        return rec

    def resign(self) -> None:
        """New signatures for every collection, as a fresh API answer would carry."""
        expiry = int(self.wall() + self.signature_ttl)
        for rec in self.collections.values():
            rec.manifest_text = re.sub(r"\+A[0-9a-f]{40}@[0-9a-f]{8}", f"+A{'b' * 40}@{expiry:08x}",
                                       rec.manifest_text)
            if "manifest_text" in rec.answer:
                rec.answer["manifest_text"] = rec.manifest_text

    async def _find(self, cid: CollectionId) -> Record:
        if cid.text in self.stall:
            await self.stall[cid.text].wait()
        if cid.text in self.fail:
            raise self.fail[cid.text]
        rec = self.collections.get(cid.text)
        if rec is None:
            raise NotFound(cid.cluster or "zzzzz", f"GET collections/{cid.text}: not found", 404)
        return rec

    async def get_collection(self, cid: CollectionId) -> Record:
        self.calls.append(cid.text)
        return Record(**vars(await self._find(cid)))

    async def get_summary(self, cid: CollectionId, fields: list[str]) -> CollectionSummary:
        """As the API answers with ``select``: only those fields, and no manifest text."""
        self.summaries.append((cid.text, list(fields)))
        rec = await self._find(cid)
        selected = {k: rec.answer.get(k) for k in fields}
        return CollectionSummary(rec.uuid, rec.portable_data_hash, rec.modified_at, rec.cluster, selected,
                                 rec.route)


class FakeFileReader:
    def __init__(self, owner: FakeBlockReader, file: File):
        self.owner = owner
        self.file = file
        self.closed = False
        self.locators = [str(s.locator) for s in file.segments()]

    async def read(self, offset: int, size: int) -> bytes:
        if self.owner.broken:
            raise BlockError(parse_locator(self.locators[0]), "zbbbb: every keep service failed")
        out = b""
        for s in self.file.segments():
            if s.file_offset + s.length <= offset or s.file_offset >= offset + size:
                continue
            block = self.owner.blocks[s.locator.key][s.block_offset : s.block_offset + s.length]
            start = max(offset - s.file_offset, 0)
            out += block[start : offset + size - s.file_offset]
        self.owner.reads += 1
        return out

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeBlockReader:
    blocks: dict[str, bytes]
    opened: list[FakeFileReader] = field(default_factory=list)
    broken: bool = False
    reads: int = 0

    def open(self, file: File, route: KeepRoute) -> FakeFileReader:
        reader = FakeFileReader(self, file)
        self.opened.append(reader)
        return reader


UUID_A = "zzzzz-4zz18-aaaaaaaaaaaaaaa"
UUID_B = "zbbbb-4zz18-bbbbbbbbbbbbbbb"
FILES_A = {"hello.txt": b"hello world\n", "dir/sub/deep.bin": bytes(range(256)) * 10, "dir/empty": b""}
FILES_B = {"remote file.txt": b"from zbbbb\n"}


@pytest.fixture
async def world(nursery):
    wall, mono = Clock(NOW), Clock(1000.0)
    fed = FakeFederation(wall)
    fed.put(UUID_A, FILES_A)
    fed.put(UUID_B, FILES_B)
    reader = FakeBlockReader(fed.blocks)
    stats = Stats()

    def make(**kwargs: Any) -> Tree:
        tree = Tree(fed, reader, stats=stats, clock=mono, wall=wall, refresh_time=15.0, **kwargs)
        tree.calls.nursery = nursery  # as the daemon serves it: API calls in the background
        return tree

    return fed, reader, stats, wall, mono, make


async def path_node(tree: Tree, path: str):
    ino = ROOT_INODE
    for part in path.split("/"):
        ino = (await tree.lookup(ino, part)).ino
    return ino


async def read_all(tree: Tree, path: str) -> bytes:
    handle = await tree.open(await path_node(tree, path))
    try:
        return await handle.read(0, 1 << 30)
    finally:
        handle.close()


async def names(tree: Tree, ino: int) -> list[str]:
    return [name for name, _ in await tree.listdir(ino)]


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


async def test_hidden_collection_record(world):
    fed, *_, make = world
    tree = make()
    coll = await path_node(tree, f"by_id/{UUID_A}")
    assert ".arvados#collection" not in await names(tree, coll)
    record = json.loads(await read_all(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert record["manifest_text"] == fed.collections[UUID_A].manifest_text
    attr = await tree.getattr(await path_node(tree, f"by_id/{UUID_A}/.arvados#collection"))
    assert attr.attr_timeout == 0 and attr.mode == stat.S_IFREG | 0o444


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


async def test_pdh_and_uuid_files_open_with_keep_cache(world):
    fed, *_, make = world
    tree = make()
    pdh = fed.collections[UUID_A].portable_data_hash
    assert (await tree.open(await path_node(tree, f"by_id/{pdh}/hello.txt"))).keep_cache
    assert (await tree.open(await path_node(tree, f"by_id/{UUID_A}/hello.txt"))).keep_cache
    with pytest.raises(FsError) as e:
        await tree.open(await path_node(tree, f"by_id/{pdh}/dir"))
    assert e.value.errno == errno.EISDIR


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


async def settle() -> None:
    """Until every task waits for something other than a worker thread: the background calls
    released have ended."""
    await trio.testing.wait_all_tasks_blocked()
    while trio.testing.active_thread_count():
        await trio.testing.wait_all_threads_completed()
        await trio.testing.wait_all_tasks_blocked()


@pytest.fixture
def stalled(world, mock_clock):
    """`stall(id)`: the fake federation's calls about `id` wait for the event it returns.

    Tests using it run on `mock_clock` (they ask for it too, so that pytest-trio runs them on
    it), which jumps to the next deadline once every task has waited for half a second: a
    manifest parse in a worker thread also makes every task wait, and must not count as a
    stall."""
    mock_clock.autojump_threshold = 0.5
    fed = world[0]

    def stall(cid: str) -> trio.Event:
        event = fed.stall[cid] = trio.Event()
        return event

    return stall


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
