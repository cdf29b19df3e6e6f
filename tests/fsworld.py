"""Fakes and fixtures of the filesystem model's unit tests (tests/test_fs_*.py).

The federation and the block reader are small fakes of their interfaces
(`Federation.get_collection`, `BlockReader.open` -> `FileReader.read/close`); manifests are
parsed by the real parser. The fixture `world` makes trees over them; `stalled` makes the
fake federation's calls about an id wait (on trio's mock clock). A test module imports the
fixtures under their function names (`world_fixture`, `stalled_fixture`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from fedmount.api.federation import CollectionSummary
from fedmount.arvados.errors import BlockError, NotFound
from fedmount.arvados.ids import CollectionId, parse_locator
from fedmount.arvados.manifest import File, portable_data_hash
from fedmount.arvados.routes import KeepRoute
from fedmount.fs.inodes import ROOT_INODE
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


@pytest.fixture(name="world")
async def world_fixture(nursery):
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


async def settle() -> None:
    """Until every task waits for something other than a worker thread: the background calls
    released have ended."""
    await trio.testing.wait_all_tasks_blocked()
    while trio.testing.active_thread_count():
        await trio.testing.wait_all_threads_completed()
        await trio.testing.wait_all_tasks_blocked()


@pytest.fixture(name="stalled")
def stalled_fixture(world, mock_clock):
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
