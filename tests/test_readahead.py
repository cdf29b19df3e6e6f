"""BlockReader/FileReader over a real manifest, a real cache and an in-process Keep transport."""

from __future__ import annotations

import hashlib
import mmap
import random
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
from keepfakes import received  # tests/ is on sys.path under pytest

from fedmount.arvados.errors import BlockNotFound
from fedmount.arvados.manifest import File, parse_manifest
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.fetcher import BlockReader
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.readahead import KEPT_SEGMENTS
from fedmount.blocks.transport import Response, Sink, Timeouts
from fedmount.stats import Stats

KiB, MiB = 1 << 10, 1 << 20
SERVICES = tuple(KeepService(f"zzzzz-bi6l4-{i:015x}", f"http://keep{i}.test:25107/") for i in range(2))
ROUTE = KeepRoute("zzzzz", "v2/zzzzz-gj3su-000000000000000/secret", SERVICES)


class Keepstore:
    """A BlockTransport serving a dict of blocks; counts GETs and the peak concurrency."""

    def __init__(self, blocks: list[bytes], missing: frozenset[str] = frozenset()):
        self.blocks = {hashlib.md5(b).hexdigest(): b for b in blocks}
        self.missing = missing
        self.gets: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def __call__(
        self, method: str, url: str, headers: Mapping[str, str], size: int, timeouts: Timeouts, sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        block_hash = url.rsplit("/", 1)[1][:32]
        with self.lock:
            self.gets.append(block_hash)
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.gate.wait(10)
            if block_hash in self.missing:
                return Response(404)
            data = self.blocks[block_hash]
            sink(memoryview(data))
            return Response(200, received(data, into))
        finally:
            with self.lock:
                self.active -= 1


def pattern(size: int, seed: int) -> bytes:
    unit = hashlib.sha256(b"%d" % seed).digest()
    return (unit * (size // len(unit) + 1))[:size]


def locator_text(data: bytes) -> str:
    return f"{hashlib.md5(data).hexdigest()}+{len(data)}"


def make(
    tmp_path: Path, blocks: list[bytes], files: str, **kw: int
) -> tuple[BlockReader, Keepstore, Stats, dict[str, File]]:
    manifest = parse_manifest(". " + " ".join(locator_text(b) for b in blocks) + " " + files + "\n")
    store = Keepstore(blocks)
    stats = Stats()
    keep = KeepClient(store, stats=stats, backoff=0)
    cache = TieredCache(str(tmp_path), disk_limit=256 * MiB, ram_limit=64 * MiB, stats=stats)
    return BlockReader(keep, cache, stats=stats, **kw), store, stats, dict(manifest.walk())


async def remount_after_reading(
    tmp_path: Path, blocks: list[bytes]
) -> tuple[BlockReader, Keepstore, Stats, File]:
    """Read file "f" (the blocks end to end) once, filling the disk cache, then a fresh reader of
    the same cache (a remount) and its "f"."""
    whole = b"".join(blocks)
    first, _, _, files = make(tmp_path, blocks, f"0:{len(whole)}:f")
    assert await first.open(files["f"], ROUTE).read(0, len(whole)) == whole
    await settle(first.stats)
    reader, store, stats, files = make(tmp_path, blocks, f"0:{len(whole)}:f")
    return reader, store, stats, files["f"]


async def settle(stats: Stats) -> None:
    """Wait until no fetch is in flight."""
    await trio.sleep(0)
    with trio.fail_after(10):
        while stats.get("read_ahead_inflight_bytes"):
            await trio.sleep(0.005)


async def test_concurrent_readers_of_one_block_share_one_get(tmp_path: Path) -> None:
    block = pattern(2 * MiB, 1)
    reader, store, stats, files = make(tmp_path, [block], f"0:{len(block)}:f")
    store.gate.clear()
    results: list[bytes] = []

    async def read_one(i: int) -> None:
        handle = reader.open(files["f"], ROUTE)
        results.append(bytes(await handle.read(i * 100 * KiB, 4 * KiB)))  # a view lasts until an await

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(read_one, i)
        await trio.sleep(0.05)
        store.gate.set()
    assert len(store.gets) == 1
    assert sorted(results) == sorted(block[i * 100 * KiB : i * 100 * KiB + 4 * KiB] for i in range(10))


async def test_sequential_reader_opens_wide_doubles_and_seek_resets_it(tmp_path: Path) -> None:
    blocks = [pattern(MiB, i) for i in range(12)]
    whole = b"".join(blocks)
    reader, store, stats, files = make(
        tmp_path, blocks, f"0:{len(whole)}:big", read_ahead_blocks=8, initial_window=2
    )
    handle = reader.open(files["big"], ROUTE)
    windows = []
    got = bytearray()
    for offset in range(0, 5 * MiB, 128 * KiB):
        got += await handle.read(offset, 128 * KiB)
        windows.append(handle.window)
    assert bytes(got) == whole[: 5 * MiB]
    # the initial window from the first read, doubling per new block, capped at read_ahead_blocks
    assert windows[0] == 2 and windows[8] == 4 and windows[16] == 8 and max(windows) == 8
    await settle(stats)
    assert stats.get("read_ahead_started") > 0
    assert stats.get("read_ahead_used") >= 4
    assert len(store.gets) == len(set(store.gets))  # never the same block twice
    assert await handle.read(MiB + 5, 10) == whole[MiB + 5 : MiB + 15]  # a seek back
    assert handle.window == 0


async def test_fresh_reader_has_every_block_of_a_short_file_in_flight_at_once(tmp_path: Path) -> None:
    blocks = [pattern(MiB, i) for i in range(4)]
    reader, store, stats, files = make(tmp_path, blocks, f"0:{4 * MiB}:f")
    store.gate.clear()
    handle = reader.open(files["f"], ROUTE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle.read, 0, MiB)
        with trio.fail_after(5):
            while store.active < 4:  # the demand GET and three read-aheads, before any answer
                await trio.sleep(0.005)
        assert handle.window == 4
        store.gate.set()
    await settle(stats)
    assert len(store.gets) == 4


async def test_small_first_read_is_a_peek_and_the_next_read_opens_the_window(tmp_path: Path) -> None:
    blocks = [pattern(MiB, i) for i in range(6)]
    whole = b"".join(blocks)
    reader, store, stats, files = make(tmp_path, blocks, f"0:{len(whole)}:f")
    handle = reader.open(files["f"], ROUTE)
    assert await handle.read(0, 16 * KiB) == whole[: 16 * KiB]
    await settle(stats)
    assert handle.window == 0 and len(store.gets) == 1  # the peek's own block, alone
    assert await handle.read(16 * KiB, 16 * KiB) == whole[16 * KiB : 32 * KiB]
    await settle(stats)
    assert handle.window == 4 and len(store.gets) == 5


async def test_random_reader_does_not_read_ahead(tmp_path: Path) -> None:
    blocks = [pattern(MiB, i) for i in range(40)]
    reader, store, stats, files = make(tmp_path, blocks, f"0:{40 * MiB}:f")
    handle = reader.open(files["f"], ROUTE)
    for offset in (35 * MiB + 7, 2 * MiB + 3, 30 * MiB, 20 * KiB + 1):
        await handle.read(offset, 100)
    await settle(stats)
    assert stats.get("read_ahead_started") == 0


async def test_read_ahead_crosses_file_boundaries_in_the_stream(tmp_path: Path) -> None:
    blocks = [pattern(300 * KiB, i) for i in range(3)]
    files_text = f"0:{300 * KiB}:a.txt {300 * KiB}:{300 * KiB}:b.txt {600 * KiB}:{300 * KiB}:c.txt"
    reader, store, stats, files = make(tmp_path, blocks, files_text)
    assert await reader.open(files["a.txt"], ROUTE).read(0, 128 * KiB) == blocks[0][: 128 * KiB]
    await settle(stats)
    assert len(store.gets) == 3  # a.txt's block, and b.txt's and c.txt's blocks ahead of time
    assert await reader.open(files["b.txt"], ROUTE).read(0, 300 * KiB) == blocks[1]
    assert await reader.open(files["c.txt"], ROUTE).read(0, 4 * KiB) == blocks[2][: 4 * KiB]
    assert len(store.gets) == 3
    assert stats.get("read_ahead_used") == 2


async def test_small_file_read_whole_is_not_a_peek(tmp_path: Path) -> None:
    blocks = [pattern(8 * KiB, i) for i in range(3)]
    files_text = " ".join(f"{i * 8 * KiB}:{8 * KiB}:{name}" for i, name in enumerate("abc"))
    reader, store, stats, files = make(tmp_path, blocks, files_text)
    assert await reader.open(files["a"], ROUTE).read(0, 8 * KiB) == blocks[0]
    await settle(stats)
    assert len(store.gets) == 3  # the next files' blocks were fetched ahead


async def test_small_files_packed_in_one_block(tmp_path: Path) -> None:
    block = pattern(64 * KiB, 7)
    names = " ".join(f"{i * 4 * KiB}:{4 * KiB}:f{i}" for i in range(16))
    reader, store, stats, files = make(tmp_path, [block], names)
    for i in range(16):
        assert (
            await reader.open(files[f"f{i}"], ROUTE).read(0, 64 * KiB)
            == block[i * 4 * KiB : (i + 1) * 4 * KiB]
        )
    assert len(store.gets) == 1


async def test_read_spanning_blocks_assembles_pieces(tmp_path: Path) -> None:
    blocks = [pattern(100 * KiB, i) for i in range(4)]
    whole = b"".join(blocks)
    reader, _, _, files = make(tmp_path, blocks, f"10:{len(whole) - 20}:f")
    handle = reader.open(files["f"], ROUTE)
    assert await handle.read(50 * KiB, 250 * KiB) == whole[10 + 50 * KiB : 10 + 300 * KiB]
    assert await handle.read(0, 10 * MiB) == whole[10:-10]
    assert await handle.read(len(whole), 10) == b""


@pytest.mark.parametrize("count", [1, KEPT_SEGMENTS, KEPT_SEGMENTS + 1])
async def test_random_reads_find_their_segments_whether_listed_or_walked(tmp_path: Path, count: int) -> None:
    blocks = [pattern(3 * KiB + i, i) for i in range(count)]
    # each segment leaves out the first 100 bytes of its block: block and file offsets differ
    starts = [sum(len(b) for b in blocks[:i]) for i in range(count)]
    tokens = " ".join(f"{start + 100}:{len(b) - 100}:f" for start, b in zip(starts, blocks, strict=True))
    reader, _, _, files = make(tmp_path, blocks, tokens)
    whole = b"".join(b[100:] for b in blocks)
    handle = reader.open(files["f"], ROUTE)
    rng = random.Random(count)
    cuts = [0] + [sum(len(b) - 100 for b in blocks[: i + 1]) for i in range(count)]
    for offset, size in [(c, 1) for c in cuts] + [(c - 1, 2) for c in cuts[1:]] + [
        (rng.randrange(len(whole)), rng.choice((1, 4 * KiB, 9 * KiB))) for _ in range(200)
    ]:
        assert await handle.read(offset, size) == whole[offset : offset + size], (offset, size)
    assert (handle._kept is None) == (count > KEPT_SEGMENTS)


async def test_block_error_reaches_the_reader(tmp_path: Path) -> None:
    good, bad = pattern(1000, 1), pattern(1000, 2)
    reader, store, _, files = make(tmp_path, [good, bad], "0:2000:f")
    store.missing = frozenset({hashlib.md5(bad).hexdigest()})
    handle = reader.open(files["f"], ROUTE)
    assert await handle.read(0, 1000) == good
    with pytest.raises(BlockNotFound, match=re.escape(locator_text(bad))):
        await handle.read(1000, 1000)
    await settle(reader.stats)
    cached = sorted(p.name for p in (tmp_path / "blocks").rglob("*") if p.is_file())
    assert cached == [locator_text(good)]  # the failed fetch left no temporary file behind


async def test_fetched_blocks_are_received_into_their_cache_file(tmp_path: Path) -> None:
    blocks = [pattern(3 * MiB, 1)]
    reader, _, _, files = make(tmp_path, blocks, f"0:{3 * MiB}:f")
    got = await reader.open(files["f"], ROUTE).read(0, 3 * MiB)
    assert got == blocks[0]
    await settle(reader.stats)
    assert not isinstance(got, bytes) and isinstance(got.obj, mmap.mmap)  # a view of the file's mapping
    reread, _, _, files = make(tmp_path, blocks, f"0:{3 * MiB}:f")  # a remount: from the disk cache
    assert await reread.open(files["f"], ROUTE).read(0, 3 * MiB) == blocks[0]
    assert reread.stats.get("keep_requests") == 0


class RecoveringKeepstore(Keepstore):
    """Answers 404 for the `missing` blocks until every service was asked once: keepstores
    that come back right after one client's round of attempts failed."""

    def __call__(self, method, url, headers, size, timeouts, sink, into=None) -> Response:
        response = super().__call__(method, url, headers, size, timeouts, sink, into)
        block_hash = url.rsplit("/", 1)[1][:32]
        with self.lock:
            if self.gets.count(block_hash) >= len(SERVICES):
                self.missing = self.missing - {block_hash}
        return response


async def test_read_joining_a_failed_read_ahead_fetches_again(tmp_path: Path) -> None:
    first, second = pattern(1 * MiB, 7), pattern(1 * MiB, 8)
    reader, _, stats, files = make(tmp_path, [first, second], f"0:{2 * MiB}:f")
    store = RecoveringKeepstore([first, second], missing=frozenset({hashlib.md5(second).hexdigest()}))
    reader._keep = KeepClient(store, stats=stats, backoff=0)
    store.gate.clear()
    handle = reader.open(files["f"], ROUTE)
    result: list[bytes] = []

    async def read_second() -> None:
        result.append(bytes(await handle.read(1 * MiB, 64 * KiB)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle.read, 0, 64 * KiB)  # sequential: reads the second block ahead
        await trio.sleep(0.05)
        nursery.start_soon(read_second)  # joins the read-ahead fetch, which is about to fail
        await trio.sleep(0.05)
        store.gate.set()
    assert result == [second[: 64 * KiB]]
    assert stats.get("read_ahead_errors") == 1


async def test_read_ahead_respects_memory_budget(tmp_path: Path) -> None:
    blocks = [pattern(MiB, i) for i in range(8)]
    reader, store, stats, files = make(tmp_path, blocks, f"0:{8 * MiB}:f", read_ahead_memory=MiB)
    handle = reader.open(files["f"], ROUTE)
    await handle.read(0, 128 * KiB)  # the demand fetch finished; one block of budget left
    await settle(stats)
    assert stats.get("read_ahead_started") == 1


async def test_read_ahead_concurrency_per_service_is_bounded(tmp_path: Path) -> None:
    blocks = [pattern(256 * KiB, i) for i in range(24)]
    size = 24 * 256 * KiB
    reader, store, stats, files = make(
        tmp_path, blocks, f"0:{size}:f", read_ahead_blocks=16, per_service=1, per_cluster=2
    )
    store.gate.clear()
    handle = reader.open(files["f"], ROUTE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle.read, 0, 128 * KiB)
        await trio.sleep(0.05)
        store.gate.set()
    for offset in range(0, size, 128 * KiB):
        await handle.read(offset, 128 * KiB)
    await settle(stats)
    # two services, one read-ahead fetch each, plus demand reads which are never limited
    assert store.peak <= 3


async def test_warm_sequential_reader_finds_the_next_block_loaded_at_the_boundary(tmp_path: Path) -> None:
    blocks = [pattern(4 * MiB, i) for i in range(3)]
    whole = b"".join(blocks)
    reader, store, stats, file = await remount_after_reading(tmp_path, blocks)
    handle = reader.open(file, ROUTE)
    for offset in range(0, len(whole), MiB):
        before = stats.get("cache_hits", tier="disk")
        assert await handle.read(offset, MiB) == whole[offset : offset + MiB]
        if offset in (4 * MiB, 8 * MiB):  # the first read of a block: already in memory
            assert stats.get("cache_hits", tier="disk") == before
        await settle(stats)  # the read-ahead's cache checks
        with trio.fail_after(10):
            while reader._cache._loading:  # and the background loads from disk
                await trio.sleep(0.005)
    assert store.gets == []


async def test_reads_from_disk_are_views_that_stay_valid(tmp_path: Path) -> None:
    blocks = [pattern(MiB, i) for i in range(3)]
    whole = b"".join(blocks)
    reader, _, _, file = await remount_after_reading(tmp_path, blocks)
    handle = reader.open(file, ROUTE)
    one = await handle.read(0, 4 * KiB)
    assert isinstance(one, memoryview) and one.readonly  # within one block: the mapped file, not a copy
    assert one == whole[: 4 * KiB]
    assert await handle.read(0, len(whole)) == whole  # across blocks: joined
    assert one == whole[: 4 * KiB]  # still valid after other reads and awaits


class Ticker:
    """A task that wakes every `period` seconds and records the longest gap between its wakeups:
    how long the trio thread was held by something else."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.longest = 0.0
        self.last = trio.current_time()

    async def run(self) -> None:
        while True:
            await trio.sleep(self.period)
            self.woke()

    def woke(self) -> None:
        now = trio.current_time()
        self.longest = max(self.longest, now - self.last - self.period)
        self.last = now


@pytest.mark.parametrize("shape", ["one block, same byte", "one block, in order", "two blocks, alternating"])
async def test_a_file_of_many_one_byte_segments_reads_in_linear_time_and_yields(
    tmp_path: Path, shape: str
) -> None:
    a, b = pattern(1000, 1), pattern(1000, 2)
    n = 50_000  # a legal file; planning was O(n^2) on the trio thread: 25 s here, 100,000 hours
    if shape == "two blocks, alternating":
        blocks, tokens = [a, b], [f"{(i % 2) * 1000 + i % 997}:1:f" for i in range(n)]
        expected = bytes((a, b)[i % 2][i % 997] for i in range(n))
    else:
        same = shape == "one block, same byte"
        blocks, tokens = [a], [f"{0 if same else i % 1000}:1:f" for i in range(n)]
        expected = bytes(a[0 if same else i % 1000] for i in range(n))
    reader, store, stats, files = make(tmp_path, blocks, " ".join(tokens))
    handle = reader.open(files["f"], ROUTE)
    ticker = Ticker()
    got = bytearray()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        for offset in range(0, n, 16 * KiB):  # reads of many pieces each
            got += await handle.read(offset, 16 * KiB)
        ticker.woke()  # the stretch since its last wakeup counts too
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    assert bytes(got) == expected
    assert len(store.gets) == len(blocks)  # each block fetched once
    # Quiet: 0.2-1.5 s in all, the trio thread held at most ~20 ms at a time; the bounds
    # allow for a loaded 2-core machine.
    print(shape, elapsed, ticker.longest, stats.get("read_ahead_depth"))
    assert elapsed < 10 and ticker.longest < 1.0, (elapsed, ticker.longest)


@pytest.mark.parametrize("tier", ["ram", "disk"])
async def test_readers_outnumbering_the_cache_fetch_each_block_once(tmp_path: Path, tier: str) -> None:
    """16 sequential readers of their own 4 MiB file (one block each) through a 2-block cache."""
    blocks = [pattern(4 * MiB, seed) for seed in range(16)]
    files = " ".join(f"{i * 4 * MiB}:{4 * MiB}:f{i}" for i in range(16))
    manifest = parse_manifest(". " + " ".join(locator_text(b) for b in blocks) + " " + files + "\n")
    store = Keepstore(blocks)
    stats = Stats()
    disk_limit, ram_limit = (8 * MiB, MiB) if tier == "disk" else (0, 8 * MiB)  # two blocks
    cache = TieredCache(str(tmp_path), disk_limit=disk_limit, ram_limit=ram_limit, stats=stats)
    reader = BlockReader(KeepClient(store, stats=stats, backoff=0), cache, stats=stats)
    by_name = dict(manifest.walk())
    wrong: list[str] = []

    async def read_twice(i: int) -> None:
        for _ in range(2):
            handle, got = reader.open(by_name[f"f{i}"], ROUTE), bytearray()
            for offset in range(0, 4 * MiB, 128 * KiB):
                got += await handle.read(offset, 128 * KiB)
                await trio.sleep(0.001)  # the readers' reads interleave
            if got != blocks[i]:
                wrong.append(f"f{i}")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(read_twice, i)
    assert wrong == []
    # One GET per file read, and a few read-aheads made while there was room and evicted before
    # their reader came (before holds: 187 GETs, each block fetched again and again under its reader).
    assert len(store.gets) <= 40, f"{len(store.gets)} GETs for 32 file reads"
    assert stats.get("fetch_waits") > 0  # readers beyond the room waited their turn
