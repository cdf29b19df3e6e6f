"""A bad neighbour in the disk cache, on a real mount: another user who can write it, a block file
truncated while mapped, a fetch killed midway, a corrupt index, an index another process locks.

What every test asserts: a byte is never wrong (the file's md5, or ``cat`` compared byte by
byte); the daemon stays up; what it says is one line per fault. Another user is a real one,
made with ``useradd`` for the session (root only, like giving a file to another user).
What each scenario measured is recorded like the other reliability scenarios.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedmount.blocks.cache.files import STALE_TEMPORARY
from fedmount.blocks.cache.format import trailer
from integration.mounting import REPO, Mount, Recorder, fedmount_cmd, requires_fuse, run, timed_read, wait_for
from integration.test_reliability import cache_warnings, content, fresh, keep_gets, wrong_bytes_served

pytestmark = requires_fuse

MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="another user, chown and tmpfs mounts need root")


@pytest.fixture(scope="session")
def record(tmp_path_factory) -> Recorder:
    return Recorder(tmp_path_factory.getbasetemp() / "reliability.jsonl")


@pytest.fixture(scope="session")
def other_user():
    """(uid, gid) of a real second user, made for the session and removed after it."""
    if os.geteuid() != 0:
        pytest.skip("making a second user needs root")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed (package passwd)")
    name = f"fmother{os.getpid()}"
    run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name)
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        run("userdel", name, check=False)


@pytest.fixture
def public_dir():
    """A directory like /tmp (1777: anyone may make entries, only their owner may remove them)."""
    path = Path(tempfile.mkdtemp(prefix="fedmount-public-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def block_keys(coll: dict, path: str, block_size: int = MiB) -> list[str]:
    data = content(coll, path)
    return [f"{hashlib.md5(data[i : i + block_size]).hexdigest()}+{len(data[i : i + block_size])}"
            for i in range(0, len(data), block_size)]  # fmt: skip


def poisoned(key: str) -> bytes:
    """A block file for `key` with the wrong bytes and a right trailer for them (xxh3 is unkeyed)."""
    wrong = b"\xee" * int(key.split("+")[1])
    return wrong + trailer(wrong)


def filled_cache(mount, coll: dict) -> Path:
    """The disk cache of a mount that read ``data.bin`` of `coll` once (and is stopped)."""
    first = mount()
    assert timed_read(first / f"by_id/{coll['uuid']}/data.bin").md5 == coll["files"]["data.bin"]["md5"]
    first.stop()
    return first.cache


def read_after_remount(fed, mount, cache: Path, coll: dict) -> tuple[Mount, list[str], list[str]]:
    """A new mount of `cache` reads ``data.bin`` byte by byte (every byte must be right): the mount,
    its cache warnings and the hashes of the blocks it fetched from Keep meanwhile."""
    mark = fed.mark()
    m = mount("--disk-cache-dir", str(cache))
    wrong, failed = wrong_bytes_served(m / f"by_id/{coll['uuid']}/data.bin", content(coll, "data.bin"))
    assert not failed and wrong == 0
    return m, cache_warnings(m), [r["path"][1:33] for r in keep_gets(fed, mark)]


def as_user(user: tuple[int, int], script: str, *args: str, data: bytes = b"") -> None:
    uid, gid = user
    subprocess.run(["sh", "-c", script, "sh", *args], input=data, user=uid, group=gid, check=True, timeout=60)


@needs_root
@pytest.mark.parametrize("how", ["their directory", "a directory anyone can write"])
def test_cache_directory_another_user_can_write_is_refused_and_their_planted_block_never_served(
    fed, mount, record, other_user, public_dir, how
):
    coll = fresh(fed, "zzzzz", {"data.bin": 3 * MiB})
    target = block_keys(coll, "data.bin")[1]
    cache = public_dir / "cache"
    if how == "their directory":
        as_user(other_user, 'mkdir -m 700 "$1"', str(cache))
    else:
        cache.mkdir()
        cache.chmod(0o777)
    plant = f'mkdir -p "$1/blocks/{target[:2]}" && cat > "$1/blocks/{target[:2]}/{target}"'
    as_user(other_user, plant, str(cache), data=poisoned(target))
    m = mount("--disk-cache-dir", str(cache))
    path = m / f"by_id/{coll['uuid']}/data.bin"
    wrong, failed = wrong_bytes_served(path, content(coll, "data.bin"))
    assert not failed and wrong == 0
    warnings = cache_warnings(m)
    assert len(warnings) == 1 and f"refusing {cache}" in warnings[0], warnings
    assert m.stats()["cache_degraded"] == 1
    record(f"cache directory another user can write ({how})", outcome="refused with one line, "
           "memory cache only; the block they planted never served", wrong_bytes=wrong)  # fmt: skip


@needs_root
def test_block_file_another_user_owns_in_our_cache_is_discarded_and_fetched_again(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 3 * MiB})
    cache = filled_cache(mount, coll)
    target = block_keys(coll, "data.bin")[2]
    planted = cache / "blocks" / target[:2] / target
    planted.write_bytes(poisoned(target))
    os.chown(planted, 65534, 65534)  # as if planted by nobody, when the directory was not yet safe
    _, warnings, fetched = read_after_remount(fed, mount, cache, coll)
    assert len(warnings) == 1 and "belongs to uid 65534" in warnings[0], warnings
    assert fetched == [target[:32]]  # only that block, from Keep
    record("block file another user owns in the cache", outcome="discarded with one warning, fetched "
           "again", wrong_bytes=0)  # fmt: skip


def test_cache_files_are_private_to_their_user(fed, mount):
    coll = fresh(fed, "zzzzz", {"a.bin": 2 * MiB, "b.bin": 100})
    m = mount()
    for name in ("a.bin", "b.bin"):
        assert timed_read(m / f"by_id/{coll['uuid']}/{name}").ok
    wait_for(lambda: any(m.cache.glob("blocks/*/*")), 10, "blocks on disk")
    modes = {p: stat.S_IMODE(p.lstat().st_mode) for p in [m.cache, *m.cache.rglob("*")]}
    assert {mode for p, mode in modes.items() if p.is_dir()} == {0o700}, modes
    assert {mode for p, mode in modes.items() if p.is_file()} == {0o600}, modes
    assert m.cache / "index.sqlite3" in modes


SLOW_READER = """
import hashlib, sys, time
h = hashlib.md5()
with open(sys.argv[1], "rb", buffering=0) as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
        print(f.tell(), flush=True)
        time.sleep(0.1)
print(h.hexdigest(), flush=True)
"""


def test_truncating_a_mapped_block_file_discards_it_and_the_daemon_lives(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 16 * MiB}, block_size=16 * MiB)
    cache = filled_cache(mount, coll)
    [key] = block_keys(coll, "data.bin", 16 * MiB)
    block = cache / "blocks" / key[:2] / key
    mark = fed.mark()
    second = mount("--disk-cache-dir", str(cache))
    reader = subprocess.Popen(
        [sys.executable, "-c", SLOW_READER, str(second / f"by_id/{coll['uuid']}/data.bin")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdout is not None
    while int(reader.stdout.readline()) < 4 * MiB:  # the reader is inside the mapped block file
        pass
    started = time.monotonic()
    os.truncate(block, 0)  # waits until the daemon let the file go (`truncate` would fail: EAGAIN)
    waited = time.monotonic() - started
    lines = reader.stdout.read().split()
    assert reader.wait(60) == 0
    assert lines[-1] == coll["files"]["data.bin"]["md5"]
    assert second.proc.poll() is None  # alive: no SIGBUS
    warnings = cache_warnings(second)
    assert len(warnings) == 1 and "opened it to write or truncate it" in warnings[0], warnings
    assert [r["path"][1:33] for r in keep_gets(fed, mark)] == [key[:32]]  # fetched again, once
    assert waited < 10  # the lease watcher looks every 0.5 s (generous for a loaded 2-core machine)
    record("block file truncated while mapped", outcome="the truncation waited until the daemon let "
           "the file go; entry discarded with one warning, block fetched again", wrong_bytes=0,
           truncate_waited_seconds=round(waited, 2))  # fmt: skip


def test_sigkill_mid_fetch_leaves_no_temporary_file_and_dead_ones_are_removed_at_start(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"slow.bin": 64 * MiB}, block_size=64 * MiB)
    fed.set_fault("zzzzz", "*", bandwidth=4 * MiB)  # ~16 s per block: the kill lands mid-fetch
    m = mount()
    reader = subprocess.Popen(["cat", str(m / f"by_id/{coll['uuid']}/slow.bin")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: m.stats().get("read_ahead_inflight_bytes", 0) > 0, 20, "the fetch started")
    time.sleep(1)
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    reader.wait(30)
    fed.clear_faults()
    left = [p for p in m.cache.rglob("*") if p.is_file() and "blocks" in p.parts]
    used = sum(p.stat().st_blocks * 512 for p in m.cache.rglob("*") if p.is_file())
    assert left == [] and used < 4 * MiB, (left, used)
    dead = m.cache / "blocks" / "00" / f"{'0' * 32}+{MiB}.tmp.4242.0123456789abcdef"  # as older versions left
    dead.parent.mkdir(exist_ok=True)
    dead.write_bytes(b"\0" * MiB)
    old = time.time() - 2 * STALE_TEMPORARY
    os.utime(dead, (old, old))
    run(*fedmount_cmd("--unmount", str(m.path)), cwd=REPO, timeout=30)
    again = mount("--disk-cache-dir", str(m.cache))
    assert not dead.exists()
    assert timed_read(again / f"by_id/{coll['uuid']}/slow.bin").md5 == coll["files"]["slow.bin"]["md5"]
    record("daemon SIGKILLed mid-fetch", outcome="no temporary file left (unnamed until complete); "
           "dead ones of older versions removed at start-up", wrong_bytes=0, left_bytes=used)  # fmt: skip


def test_corrupt_index_is_rebuilt_and_the_blocks_are_served_from_disk(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 4 * MiB})
    cache = filled_cache(mount, coll)
    (cache / "index.sqlite3").write_bytes(os.urandom(64 * 1024))
    for name in ("index.sqlite3-wal", "index.sqlite3-shm"):  # nothing to recover from either
        (cache / name).unlink(missing_ok=True)
    second, warnings, fetched = read_after_remount(fed, mount, cache, coll)
    assert len(warnings) == 1 and "rebuilt it from the 4 block files" in warnings[0], warnings
    assert fetched == [] and second.stats().get("cache_degraded", 0) == 0
    record("corrupt cache index", outcome="rebuilt from the block files with one warning; blocks "
           "served from disk, none fetched again", wrong_bytes=0)  # fmt: skip


HOLD_THE_INDEX = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")  # another process's long write: every other writer waits
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_index_locked_by_another_process_never_fails_or_stalls_a_read(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 3 * MiB})
    cache = filled_cache(mount, coll)
    second = mount("--disk-cache-dir", str(cache))
    index = str(cache / "index.sqlite3")
    argv = [sys.executable, "-c", HOLD_THE_INDEX, index, "90"]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        got = timed_read(second / f"by_id/{coll['uuid']}/data.bin", timeout=30)
        assert got.ok and got.md5 == coll["files"]["data.bin"]["md5"], got.error
        assert got.seconds < 10  # the read path waits 0.1 s per access-time update (loaded machine: 10 s)
    finally:
        holder.kill()
        holder.wait()
    assert "Unhandled exception" not in second.log.read_text()
    warnings = cache_warnings(second)
    assert len(warnings) == 1 and "cannot update" in warnings[0] and "reads go on" in warnings[0], warnings
    record("cache index locked by another process while reading", outcome="reads served from the block "
           "files at once; one warning", wrong_bytes=0, read_seconds=round(got.seconds, 2))  # fmt: skip
