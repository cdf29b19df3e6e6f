"""TieredCache against a hostile or careless neighbour: who may write the directory, files that
shrink under a mapping, temporary files of dead fetches, a corrupt index."""

from __future__ import annotations

import gc
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
from cacheblocks import block_file, fresh, make_block, on_disk  # tests/ is on sys.path under pytest

from fedmount.blocks.cache import TieredCache, files
from fedmount.blocks.cache.format import trailer

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")


def plant(cache_dir: Path, key: str, wrong: bytes) -> Path:
    """A block file with the wrong bytes and a right trailer for them (xxh3 is not keyed)."""
    path = block_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wrong + trailer(wrong))
    return path


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- who may write the directory ------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770])
async def test_a_directory_others_can_write_is_refused_and_its_blocks_never_served(
    tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    key, data = make_block(2 * MiB)
    shared = tmp_path / "shared"
    (shared / "blocks").mkdir(parents=True)
    plant(shared, key, bytes(len(data)))  # planted by whoever else can write there
    shared.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        cache, stats = fresh(shared)
        assert await cache.read(key, 0, len(data)) is None  # a miss: the block comes from Keep
    assert cache.directory is None and stats.get("cache_degraded") == 1
    [line] = warnings_of(caplog)
    assert f"refusing {shared}" in line and "can write to it" in line and "--disk-cache-dir" in line


@needs_root
async def test_a_directory_another_user_owns_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, data = make_block(MiB)
    theirs = tmp_path / "theirs"
    (theirs / "blocks").mkdir(parents=True, mode=0o700)
    plant(theirs, key, bytes(len(data)))
    for path in (theirs, *theirs.rglob("*")):
        os.chown(path, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        cache, _ = fresh(theirs)
        assert await cache.read(key, 0, len(data)) is None
    [line] = warnings_of(caplog)
    assert f"belongs to uid {NOBODY}" in line


@needs_root
async def test_a_block_file_another_user_owns_is_discarded_not_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, data = make_block(MiB)
    cache, stats = fresh(tmp_path)
    planted = plant(tmp_path, key, bytes(len(data)))
    os.chown(planted, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        assert await cache.read(key, 0, len(data)) is None
    assert not planted.exists() and stats.get("cache_corrupt") == 1
    assert f"uid {NOBODY}" in warnings_of(caplog)[0]


async def test_the_index_and_every_file_are_private(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        cache, _ = fresh(tmp_path / "c")
        for seed in range(3):
            await cache.put(*make_block(MiB, seed))  # from plain buffers: the fallback write path
        txn = await cache.begin(make_block(MiB, 7)[0], MiB)  # received into its file
        assert txn._reservation is not None
        txn.buffer[:] = make_block(MiB, 7)[1]
        await txn.commit()
    finally:
        os.umask(umask)
    root = tmp_path / "c"
    modes = {p.relative_to(root): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    assert {m for p, m in modes.items() if (root / p).is_dir()} == {0o700}
    assert {m for p, m in modes.items() if (root / p).is_file()} == {0o600}
    assert Path("index.sqlite3-wal") in modes  # SQLite made it with the index's mode


# -- a mapped block file that shrinks -------------------------------------------------

TRUNCATE = "import os, sys, time; os.truncate(sys.argv[1], 1000); print(round(time.monotonic(), 3))"


async def test_a_mapped_block_file_truncated_by_another_process_is_discarded_never_signals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, data = await on_disk(tmp_path, 8 * MiB)
    cache, stats = fresh(tmp_path)
    view = await cache.read(key, 0, 4 * MiB, verify_ahead=4)  # mapped: the read is a view of the file
    assert isinstance(view, memoryview) and view == data[: 4 * MiB]
    path = str(block_file(tmp_path, key))
    refused = subprocess.run(["truncate", "-s", "0", path], capture_output=True, text=True)
    assert refused.returncode != 0 and os.path.getsize(path) == len(data) + len(trailer(data))
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        truncating = await trio.lowlevel.open_process([sys.executable, "-c", TRUNCATE, path])
        with trio.fail_after(10):
            while cache.cached_bytes(key):  # the lease watcher discards the block
                await trio.sleep(0.05)
    assert truncating.returncode is None  # it waits while this view of the mapping lives
    assert view == data[: 4 * MiB]  # whole: no SIGBUS
    del view
    with trio.fail_after(10):
        assert await truncating.wait() == 0
    assert await cache.read(key, 4 * MiB, MiB) is None  # a miss: fetched again from Keep
    assert stats.get("cache_corrupt") == 1
    assert "another process opened it to write or truncate it" in warnings_of(caplog)[0]


async def test_a_block_file_that_cannot_be_leased_is_read_by_copy_and_a_shrink_is_caught(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, data = await on_disk(tmp_path, 4 * MiB)
    path = block_file(tmp_path, key)
    with open(path, "r+b") as held_for_writing:  # no read lease while someone may write it
        cache, stats = fresh(tmp_path)
        got = await cache.read(key, 0, 2 * MiB)
        assert not isinstance(got, memoryview) and got == data[: 2 * MiB]  # a copy, not a mapping
        held_for_writing.truncate(3 * MiB)
        with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
            assert await cache.read(key, 2 * MiB + 5, MiB) is None
    assert stats.get("cache_corrupt") == 1 and "shrank" in warnings_of(caplog)[0]


# -- temporary files ------------------------------------------------------------------

KILLED_MID_FETCH = textwrap.dedent(
    """
    import os, signal, sys, trio
    from fedmount.blocks.cache import TieredCache

    async def main():
        cache = TieredCache(sys.argv[1], disk_limit=1 << 30, ram_limit=1 << 20)
        txn = await cache.begin(sys.argv[2], int(sys.argv[2].split("+")[1]))
        txn.buffer[: 1 << 20] = b"x" * (1 << 20)  # part of a block received
        print("reserved", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    trio.run(main)
    """
)


async def test_a_fetch_killed_midway_leaves_no_temporary_file(tmp_path: Path) -> None:
    key, _ = make_block(64 * MiB)
    done = subprocess.run(
        [sys.executable, "-c", KILLED_MID_FETCH, str(tmp_path), key], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == -9 and "reserved" in done.stdout, done.stderr
    left = [p for p in (tmp_path / "blocks").rglob("*") if p.is_file()]
    assert left == []
    assert sum(p.stat().st_blocks for p in tmp_path.rglob("*") if p.is_file()) * 512 < 4 * MiB


async def test_temporary_files_of_dead_fetches_are_removed_at_start_up_live_ones_kept(
    tmp_path: Path,
) -> None:
    fresh(tmp_path)
    key, _ = make_block(MiB)
    fan = block_file(tmp_path, key).parent
    fan.mkdir(parents=True, exist_ok=True)
    dead, young, live = (fan / f"{key}.tmp.{name}" for name in ("1234.dead", "1235.young", "1236.live"))
    for path in (dead, young, live):
        path.write_bytes(b"\0" * MiB)
    old = time.time() - 2 * files.STALE_TEMPORARY
    os.utime(dead, (old, old))
    os.utime(live, (old, old))
    holder = subprocess.Popen(  # another fedmount's fetch in progress: it holds a lease on its file
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.fcntl(fd, fcntl.F_SETSIG, 23)\nfcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)\n"
         "print('leased', flush=True)\ntime.sleep(60)", str(live)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leased"
        fresh(tmp_path)  # a mount starting
        assert not dead.exists() and young.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()


async def test_named_temporary_files_are_unguessable_and_never_open_a_planted_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem cannot make unnamed files, new block files get random names, created
    exclusively: a symlink planted at the name is neither followed nor overwritten."""
    names = [files.new_file(str(tmp_path), "k", unnamed=False) for _ in range(2)]
    for fd, _ in names:
        os.close(fd)
    (_, a), (_, b) = names
    assert a != b and str(os.getpid()) not in Path(str(a)).name
    assert stat.S_IMODE(os.stat(str(a)).st_mode) == 0o600
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "guessed")
    victim = tmp_path / "victim"
    victim.write_text("mine")
    os.symlink(victim, tmp_path / "k.tmp.guessed")
    with pytest.raises(FileExistsError):
        files.new_file(str(tmp_path), "k", unnamed=False)
    assert victim.read_text() == "mine"


# -- the index ------------------------------------------------------------------------


async def test_a_corrupt_index_is_rebuilt_from_the_block_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer, _ = fresh(tmp_path, disk_limit=10 * MiB)
    blocks = [make_block(3 * MiB, seed) for seed in range(3)]
    for key, data in blocks:
        await writer.put(key, data)
    del writer
    gc.collect()  # its index closed (else the index's pages are all in its WAL, and a damaged file heals)
    (tmp_path / "index.sqlite3").write_bytes(os.urandom(64 * 1024))
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        cache, stats = fresh(tmp_path, disk_limit=10 * MiB)
    assert cache.directory == str(tmp_path) and stats.get("cache_degraded") == 0
    [line] = warnings_of(caplog)
    assert "corrupt" in line and "rebuilt it from the 3 block files" in line
    for key, data in blocks:  # still served from disk
        assert await cache.read(key, 0, len(data)) == data
    await cache.put(*make_block(3 * MiB, 99))  # and the rebuilt index bounds the directory again
    assert stats.get("cache_evictions") == 1 and stats.get("cache_disk_bytes") == 9 * MiB


def test_the_degrade_message_names_real_flags_and_the_real_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="fedmount.cache"):
        TieredCache(str(blocker / "cache"), disk_limit=MiB, ram_limit=MiB)
    [line] = warnings_of(caplog)
    assert "--disk-cache-dir" in line and "--cache-dir" not in line.replace("--disk-cache-dir", "")
    assert "free space" not in line
