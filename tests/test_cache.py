"""TieredCache: tiers, partial reads, eviction, pins, corruption, degrading, sharing between processes."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from cacheblocks import block_file, fresh, make_block  # tests/ is on sys.path under pytest

from fedmount.blocks.cache import TieredCache, files
from fedmount.blocks.cache.config import MIN_DISK_CACHE, default_cache_dir, default_disk_cache_size
from fedmount.blocks.cache.disk import MAPPED_BLOCKS, DiskTier
from fedmount.blocks.cache.format import CHUNK

MiB = 1 << 20


async def test_put_then_read_from_memory(tmp_path: Path) -> None:
    cache, stats = fresh(tmp_path)
    key, data = make_block(3 * MiB + 17)
    assert await cache.read(key, 0, 10) is None
    await cache.put(key, data)
    assert await cache.read(key, 0, len(data)) == data
    assert await cache.read(key, MiB - 5, 10) == data[MiB - 5 : MiB + 5]  # spans two chunks
    assert await cache.read(key, len(data) - 3, 100) == data[-3:]  # clipped to the block
    assert await cache.read(key, len(data), 100) == b""
    assert stats.get("cache_hits", tier="ram") == 3
    assert stats.get("cache_misses") == 1
    assert cache.cached_bytes(key) == len(data)


async def test_fresh_instance_reads_partial_ranges_from_disk(tmp_path: Path) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(5 * MiB + 3)
    await writer.put(key, data)
    reader, stats = fresh(tmp_path)  # a restarted mount: empty memory tier
    assert (
        await reader.read(key, 2 * MiB + 100, 128 << 10) == data[2 * MiB + 100 : 2 * MiB + 100 + (128 << 10)]
    )
    assert stats.get("cache_hits", tier="disk") == 1
    assert reader.cached_bytes(key) == len(data)
    for offset in range(0, len(data), 128 << 10):  # as a sequential reader asks
        got = await reader.read(key, offset, 128 << 10, verify_ahead=2)
        assert got == data[offset : offset + (128 << 10)]
    # each of the 6 chunks comes from disk once at most (how many reads find a background
    # load finished is timing: not asserted); all other reads are served from memory
    assert stats.get("cache_hits", tier="disk") <= 1 + 6
    assert stats.get("cache_hits", tier="ram") >= 30


async def test_small_random_reads_of_verified_cached_chunks_are_views_or_one_pread_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(32 * MiB)
    await writer.put(key, data)
    reader, stats = fresh(tmp_path)
    for chunk in range(32):  # verifies every chunk
        assert await reader.read(key, chunk * MiB, 4096) == data[chunk * MiB : chunk * MiB + 4096]
    offsets = (4096, 700_000, 3 * MiB + 5, 5 * MiB - 4096)
    if _cachestat():  # their pages are in the page cache: views of the mapped file, no copy
        before = stats.get("cache_hits", tier="ram")
        for offset in offsets:
            got = await reader.read(key, offset, 4096)
            assert isinstance(got, memoryview) and got.readonly and got == data[offset : offset + 4096]
        assert stats.get("cache_hits", tier="ram") == before + 4
    monkeypatch.setattr(files, "_syscall", None)  # a kernel without cachestat(2)
    before = stats.get("cache_hits", tier="disk")
    for offset in offsets:  # one non-blocking pread each
        got = await reader.read(key, offset, 4096)
        assert isinstance(got, bytearray) and got == data[offset : offset + 4096]
    assert stats.get("cache_hits", tier="disk") == before + 4
    # larger reads of verified chunks are views of the mapped file, with no copy
    view = await reader.read(key, 3 * MiB - 5, 2 * MiB)
    assert isinstance(view, memoryview) and view.readonly and view == data[3 * MiB - 5 : 5 * MiB - 5]


def _cachestat() -> bool:
    """Whether this kernel answers cachestat(2) (Linux 6.5)."""
    fd = os.open(__file__, os.O_RDONLY)
    try:
        return files.resident(fd, 0, 1) is not None
    finally:
        os.close(fd)


def _count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[int]:
    """Count the calls of a method of `obj` (the real method still runs)."""
    calls: list[int] = []
    real = getattr(obj, name)

    def counted(*args: object) -> object:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(obj, name, counted)
    return calls


def _cache_pages(path: Path, offset: int, length: int, keep: bool) -> None:
    """Bring a range of a file into the page cache, or drop it from there (a drop takes whole
    folios only, which may be larger than a chunk: ``length=0`` drops the whole file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if keep:
            os.pread(fd, length, offset)
        else:
            os.fsync(fd)  # dirty pages stay
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_a_small_read_of_cached_pages_is_verified_without_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(8 * MiB)
    await writer.put(key, data)
    path = block_file(tmp_path, key)
    _cache_pages(path, 0, 8 * MiB, keep=True)
    if not _cachestat():
        pytest.skip("no cachestat(2) here (Linux < 6.5 or a seccomp filter)")
    reader, stats = fresh(tmp_path)
    assert reader._disk is not None
    threaded = _count_calls(monkeypatch, reader._disk, "verify")
    assert await reader.read(key, 0, 4096) == data[:4096]  # opens the block file: a worker thread
    assert len(threaded) == 1
    for offset in (5 * MiB + 8192, 6 * MiB + 4096, 7 * MiB):  # cached pages: checked on the trio thread
        got = await reader.read(key, offset, 4096)
        assert isinstance(got, memoryview) and got == data[offset : offset + 4096]
    assert len(threaded) == 1
    assert {5, 6, 7} <= reader._disk.verified(key) and 3 not in reader._disk.verified(key)
    _cache_pages(path, 0, 0, keep=False)  # not cached: verified in a worker thread, as before
    assert await reader.read(key, 3 * MiB + 4096, 4096) == data[3 * MiB + 4096 : 3 * MiB + 8192]
    assert len(threaded) == 2
    assert stats.get("cache_corrupt") == 0


async def test_small_reads_of_a_block_just_received_are_views_without_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold read of a directory of small files: the block each file's first read fetched is
    served from the mapping it was received into, not by a worker thread per read."""
    cache, stats = fresh(tmp_path)
    key, data = make_block(8 * MiB, 5)
    txn = await cache.begin(key, len(data))
    txn.buffer[:] = data  # received into its future cache file, md5-verified by the fetcher
    mapping = txn.buffer  # a fetcher holds the buffer while its readers are served
    await txn.commit()
    assert cache._disk is not None
    threaded = _count_calls(monkeypatch, cache._disk, "verify")
    for offset in range(0, 8 * MiB, 256 * 1024):
        got = await cache.read(key, offset, 4096)
        assert isinstance(got, memoryview) and got == data[offset : offset + 4096]
    assert threaded == [] and stats.get("cache_corrupt") == 0
    del mapping


async def test_a_verified_range_whose_pages_left_the_page_cache_is_not_served_on_the_trio_thread(
    tmp_path: Path,
) -> None:
    if not _cachestat():
        pytest.skip("no cachestat(2) here (Linux < 6.5 or a seccomp filter)")
    writer, _ = fresh(tmp_path)
    key, data = make_block(2 * MiB)
    await writer.put(key, data)
    disk = DiskTier(str(tmp_path))
    block = disk.verify(key, 0, 1)
    assert block is not None and block.leased
    assert disk.ready(key, 4096, 8192, small=True) == data[4096:8192]
    block.mapping = None  # unmapped (nothing else refers to the mapping), then evicted
    disk._mapped.clear()
    _cache_pages(block_file(tmp_path, key), 0, 0, keep=False)
    assert disk.ready(key, 4096, 8192, small=True) is None  # the copy would wait for the disk
    assert disk.ready(key, 4096, 2 * MiB, small=False) is None
    assert disk.serve(key, block, 4096, 8192) == data[4096:8192]  # a worker thread's: faults it in
    assert files.resident(block.fd, 4096, 4096)


async def test_a_corrupt_chunk_in_the_page_cache_is_never_served_by_the_trio_threads_check(
    tmp_path: Path,
) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(4 * MiB)
    await writer.put(key, data)
    path = block_file(tmp_path, key)
    with open(path, "r+b") as f:  # before any reader opens it (leases them)
        f.seek(2 * MiB + 77)
        f.write(bytes([data[2 * MiB + 77] ^ 0x04]))
    _cache_pages(path, 0, 4 * MiB, keep=True)
    reader, stats = fresh(tmp_path)
    assert await reader.read(key, 0, 4096) == data[:4096]
    assert await reader.read(key, 3 * MiB, 4096) == data[3 * MiB : 3 * MiB + 4096]
    assert await reader.read(key, 2 * MiB, 4096) is None  # the damaged chunk, although not this page
    assert stats.get("cache_corrupt") == 1
    assert not path.exists()


async def test_default_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "fedmount")
    cache = TieredCache(None, disk_limit=MiB, ram_limit=MiB)
    assert cache.directory == str(tmp_path / "fedmount")


async def test_eviction_keeps_within_limit_lru_first(tmp_path: Path) -> None:
    cache, stats = fresh(tmp_path, disk_limit=10 * MiB, ram_limit=MiB)
    blocks = [make_block(3 * MiB, seed) for seed in range(3)]
    for key, data in blocks:
        await cache.put(key, data)
    reader, _ = fresh(tmp_path, disk_limit=10 * MiB, ram_limit=MiB)
    await reader.read(blocks[0][0], 0, 1)  # block 0 is now more recently used than block 1
    newest = make_block(3 * MiB, 99)
    await cache.put(*newest)
    assert block_file(tmp_path, blocks[0][0]).exists()
    assert not block_file(tmp_path, blocks[1][0]).exists()
    assert block_file(tmp_path, newest[0]).exists()
    assert stats.get("cache_evictions") == 1
    assert stats.get("cache_disk_bytes") == 9 * MiB


async def test_pinned_blocks_survive_eviction_from_another_instance(tmp_path: Path) -> None:
    stage, _ = fresh(tmp_path, disk_limit=6 * MiB, ram_limit=MiB)
    pinned = make_block(3 * MiB, 1)
    await stage.put(*pinned)
    stage.pin([pinned[0]])
    mount, _ = fresh(tmp_path, disk_limit=6 * MiB, ram_limit=MiB)
    assert mount.pinned() == {pinned[0]}
    for seed in range(10, 14):
        await mount.put(*make_block(3 * MiB, seed))
    assert block_file(tmp_path, pinned[0]).exists()
    mount.unpin([pinned[0]])
    await mount.put(*make_block(3 * MiB, 20))
    assert not block_file(tmp_path, pinned[0]).exists()


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "trailer"])
async def test_corrupt_cache_file_is_detected_discarded_never_served(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(3 * MiB)
    await writer.put(key, data)
    path = block_file(tmp_path, key)
    raw = bytearray(path.read_bytes())
    if damage == "bitflip":
        raw[2 * MiB + 12345] ^= 0x01
    elif damage == "truncate":
        raw = raw[: 2 * MiB]
    else:
        raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    reader, stats = fresh(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        assert await reader.read(key, 0, len(data)) is None
    assert stats.get("cache_corrupt") == 1
    assert not path.exists()
    assert key in caplog.text
    await reader.put(key, data)  # refetched from Keep
    assert await fresh(tmp_path)[0].read(key, 0, len(data)) == data


async def test_bit_flip_in_an_unread_chunk_is_caught_when_that_chunk_is_read(tmp_path: Path) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(8 * MiB)
    await writer.put(key, data)
    path = block_file(tmp_path, key)
    with open(path, "r+b") as f:
        f.seek(7 * MiB + 1)
        byte = f.read(1)
        f.seek(7 * MiB + 1)
        f.write(bytes([byte[0] ^ 0x80]))
    reader, stats = fresh(tmp_path)
    assert await reader.read(key, 0, 4096) == data[:4096]
    assert await reader.read(key, 7 * MiB, 4096) is None
    assert stats.get("cache_corrupt") == 1


async def test_unwritable_directory_degrades_to_memory_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        cache, stats = fresh(blocker / "cache")
        for seed in range(3):
            key, data = make_block(MiB, seed)
            await cache.put(key, data)
            assert await cache.read(key, 0, 10) == data[:10]
    assert cache.directory is None
    assert len(caplog.records) == 1
    assert stats.get("cache_degraded") == 1


async def test_write_failure_degrades_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, stats = fresh(tmp_path)
    (tmp_path / "blocks").rmdir()
    (tmp_path / "blocks").write_text("the disk went bad under us")  # works even as root
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        for seed in range(3):
            key, data = make_block(MiB, seed)
            await cache.put(key, data)
            assert await cache.read(key, 5, 10) == data[5:15]
    assert len(caplog.records) == 1
    assert cache.directory is None
    assert stats.get("cache_degraded") == 1


async def test_memory_tier_is_bounded(tmp_path: Path) -> None:
    cache, stats = fresh(tmp_path, disk_limit=0, ram_limit=2 * CHUNK)
    first, data = make_block(3 * MiB)
    await cache.put(first, data)
    assert stats.get("cache_ram_bytes") <= 2 * CHUNK
    assert await cache.read(first, 0, 10) is None  # oldest chunk dropped, no disk tier
    assert await cache.read(first, 2 * MiB, 10) == data[2 * MiB : 2 * MiB + 10]


async def test_put_rejects_wrong_size(tmp_path: Path) -> None:
    cache, _ = fresh(tmp_path)
    key, data = make_block(1000)
    with pytest.raises(ValueError):
        await cache.put(key, data[:-1])


SHARED_CHILD = textwrap.dedent(
    """
    import sys, trio
    from fedmount.blocks.cache import TieredCache
    directory, key, want_md5, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    async def main():
        import hashlib
        cache = TieredCache(directory, disk_limit=64 << 20, ram_limit=1 << 20)
        data = await cache.read(key, 0, size)
        assert data is not None and hashlib.md5(data).hexdigest() == want_md5, "child read wrong bytes"
        cache.pin([key])
        other = bytes(range(256)) * 4096
        await cache.put(hashlib.md5(other).hexdigest() + "+" + str(len(other)), other)
        print("ok")

    trio.run(main)
    """
)


async def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    parent, _ = fresh(tmp_path, disk_limit=64 * MiB)
    key, data = make_block(2 * MiB + 5)
    await parent.put(key, data)
    result = subprocess.run(
        [sys.executable, "-c", SHARED_CHILD, str(tmp_path), key, key[:32], str(len(data))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert parent.pinned() == {key}  # the child's pin is visible here
    other = bytes(range(256)) * 4096
    other_key = hashlib.md5(other).hexdigest() + "+" + str(len(other))
    assert await parent.read(other_key, 0, len(other)) == other  # the child's block too


def hold_as_much_as_the_filesystem(cache_dir: Path) -> int:
    """Record (in the index only) a block as big as the filesystem; returns the filesystem's size."""
    TieredCache(str(cache_dir), disk_limit=MiB, ram_limit=0)  # creates the index
    vfs = os.statvfs(cache_dir)
    total = vfs.f_blocks * vfs.f_frsize
    with sqlite3.connect(cache_dir / "index.sqlite3") as db:
        db.execute("INSERT INTO blocks VALUES (?, ?, ?)", ("0" * 32 + f"+{total}", total, 0.0))
    return total


def test_default_disk_size_counts_the_caches_own_blocks_as_free(tmp_path: Path) -> None:
    directory = tmp_path / "new"
    assert default_disk_cache_size(str(directory)) >= MIN_DISK_CACHE and directory.is_dir()
    total = hold_as_much_as_the_filesystem(directory)
    # 25% of (free + held) now exceeds 10% of the filesystem: a full cache does not shrink its bound
    assert default_disk_cache_size(str(directory)) == max(total // 10, MIN_DISK_CACHE)
    assert default_disk_cache_size("/proc/self/no-such-dir") == MIN_DISK_CACHE


async def test_concurrent_readers_of_more_block_files_than_are_mapped_get_their_bytes(tmp_path: Path) -> None:
    writer, _ = fresh(tmp_path, disk_limit=128 * MiB)
    blocks = [make_block(9 * MiB + 123, seed) for seed in range(MAPPED_BLOCKS + 2)]
    for key, data in blocks:
        await writer.put(key, data)
    reader, stats = fresh(tmp_path, disk_limit=128 * MiB, ram_limit=MiB)
    wrong: list[tuple[str, int]] = []

    async def stream(key: str, data: bytes, step: int) -> None:
        for offset in range(0, len(data), step):
            got = await reader.read(key, offset, step, verify_ahead=4)
            if got != data[offset : offset + step]:
                wrong.append((key, offset))
            await trio.sleep(0)

    kept: list[tuple[memoryview, bytes]] = []
    async with trio.open_nursery() as nursery:  # the readers cycle through more blocks than are mapped
        for i, (key, data) in enumerate(blocks):
            nursery.start_soon(stream, key, data, (MiB, 256 << 10, 3 * MiB - 7, 200 << 10)[i % 4])
            view = await reader.read(key, MiB + 5, MiB)
            assert isinstance(view, memoryview)
            kept.append((view, data[MiB + 5 : 2 * MiB + 5]))
    assert wrong == []
    assert len(reader._disk._mapped) <= MAPPED_BLOCKS
    assert all(view == want for view, want in kept)  # a view outlives its block's place in the LRU
    assert stats.get("cache_corrupt") == 0


async def test_verify_ahead_loads_the_start_of_a_block_in_the_background(tmp_path: Path) -> None:
    writer, _ = fresh(tmp_path)
    key, data = make_block(6 * MiB)
    await writer.put(key, data)
    reader, stats = fresh(tmp_path)
    reader.verify_ahead(key, 0, 4 * MiB)
    with trio.fail_after(10):
        while reader._loading:
            await trio.sleep(0.005)
    for i in range(4):
        assert await reader.read(key, i * MiB, MiB) == data[i * MiB : (i + 1) * MiB]
    assert stats.get("cache_hits", tier="ram") == 4 and stats.get("cache_hits", tier="disk") == 0


async def test_an_aborted_transaction_leaves_no_block_behind(tmp_path: Path) -> None:
    cache, _ = fresh(tmp_path)
    key, data = make_block(2 * MiB, 3)
    txn = await cache.begin(key, len(data))
    txn.buffer[:MiB] = data[:MiB]  # part of the block received, then the fetch failed
    txn.abort()
    assert await cache.read(key, 0, MiB) is None and cache.cached_bytes(key) == 0
    assert [p for p in (tmp_path / "blocks").rglob("*") if p.is_file()] == []
    txn = await cache.begin(key, len(data))
    txn.buffer[:] = data
    await txn.commit()
    assert await TieredCache(str(tmp_path), 64 * MiB, MiB).read(key, 0, len(data)) == data


async def test_usage_is_what_the_last_tier_holds_of_its_bound(tmp_path: Path) -> None:
    disk, _ = fresh(tmp_path, disk_limit=64 * MiB)
    memory = TieredCache(None, 0, 8 * MiB)
    assert disk.usage() == (64 * MiB, 0) and memory.usage() == (8 * MiB, 0)
    for cache in (disk, memory):
        await cache.put(*make_block(3 * MiB, 4))
    assert disk.usage() == (64 * MiB, 3 * MiB) and memory.usage() == (8 * MiB, 3 * MiB)
