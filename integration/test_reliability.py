"""Failure scenarios a real fedmount mount survives, each named after the failure (CVMFS style).

Every test mounts fedmount for real (FUSE) on the emulated federation, breaks something
with the emulator's fault controls (a keepstore down, corrupt or stalled; a cluster or the
home controller down; signatures expiring; the daemon SIGKILLed; the disk cache full,
read-only or corrupt) and reads through the kernel with ``md5sum`` in a child process
under a deadline. What every test asserts, whatever broke:

- a byte is never wrong: a read either returns the file's exact md5 or fails;
- a failure is an error (EIO, ENOTCONN) within a bounded time, never a hang;
- when the fault is cleared, reads succeed again without remounting.

Time bounds are generous upper limits that detect hangs, not performance claims. What each
scenario measured (how long recovery took, bytes served wrong) is appended as JSON lines to
``reliability.jsonl`` in pytest's base temporary directory and printed (``pytest -s``), for
the README's Reliability table.

Each collection is made fresh for its test (`fresh`), and each mount has its own empty
block cache, so nothing a test reads was cached by another test.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedmount.arvados.routes import KeepService
from fedmount.blocks.keep import probe_order
from integration.cluster.content import Generated
from integration.harness import Federation
from integration.mounting import (
    REPO,
    Mount,
    fedmount_cmd,
    is_mounted,
    requires_fuse,
    run,
    timed_read,
    wait_for,
)

pytestmark = requires_fuse

MiB = 1 << 20
EIO_WITHIN = 30.0  # a read that cannot succeed must fail within this many seconds
_names = itertools.count()


def fresh(fed: Federation, cluster: str, sizes: dict[str, int], block_size: int = MiB) -> dict:
    """A new collection of generated files (content no other test has), in small blocks.

    The entry also holds ``name``, from which `content` regenerates a file's bytes."""
    name = f"reliability-{os.getpid()}-{next(_names)}"
    entry = fed.add_collection(
        cluster, name, {path: (size, f"{name}/{path}") for path, size in sizes.items()}, block_size=block_size
    )
    return {**entry, "name": name}


def content(coll: dict, path: str) -> bytes:
    return Generated(coll["files"][path]["size"], f"{coll['name']}/{path}").read()


def wrong_bytes_served(path: Path, expected: bytes) -> tuple[int, bool]:
    """``cat PATH``: (how many bytes it got that differ from `expected`, whether it failed)."""
    done = subprocess.run(["cat", str(path)], capture_output=True, timeout=EIO_WITHIN)
    got = done.stdout
    wrong = sum(a != b for a, b in zip(got, expected, strict=False)) + max(0, len(got) - len(expected))
    return wrong, done.returncode != 0


def keep_service_names(fed: Federation, cluster: str) -> dict[str, KeepService]:
    """keep0/keep1 -> the KeepService the cluster's API lists for it (uuid for probe order)."""
    items = fed.request(cluster, "/arvados/v1/keep_services/accessible", token=fed.token(cluster)).json()
    by_port = {item["service_port"]: item for item in items["items"]}
    out = {}
    for index, url in enumerate(fed.keep_services(cluster)):
        item = by_port[int(url.rsplit(":", 1)[1])]
        out[f"keep{index}"] = KeepService(item["uuid"], url)
    return out


def first_choice(fed: Federation, cluster: str, block_hash: str) -> tuple[str, str]:
    """(first, second): the names of the keepstores a client asks first and second for a block."""
    services = keep_service_names(fed, cluster)
    ordered = probe_order(block_hash, list(services.values()))
    names = {s.uuid: n for n, s in services.items()}
    return names[ordered[0].uuid], names[ordered[1].uuid]


def block_hashes(path: Path) -> list[str]:
    """The hashes of a mounted file's blocks, from its user.arvados.locators xattr."""
    return [loc.split("+")[0] for loc in os.getxattr(path, "user.arvados.locators").decode().split()]


def keep_gets(fed: Federation, since: int, cluster: str | None = None) -> list[dict]:
    return [
        r
        for r in fed.requests(since)
        if r["service"].startswith("keep") and r["method"] == "GET" and cluster in (None, r["cluster"])
    ]


def until_readable(path: Path, md5: str, timeout: float) -> float:
    """Read `path` until it succeeds (each read must be right or fail); seconds until it did."""
    started = time.monotonic()
    while True:
        got = timed_read(path, EIO_WITHIN)
        if got.ok:
            assert got.md5 == md5, f"{path}: wrong bytes after recovery"
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{path} unreadable after {timeout:g}s: {got.error}"
        time.sleep(0.2)


def test_keepstore_down_fails_over_to_the_replica(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 6 * MiB})
    m = mount()
    path = m / f"by_id/{coll['uuid']}/data.bin"
    first, second = first_choice(fed, "zzzzz", block_hashes(path)[0])
    fed.set_fault("zzzzz", first, down=True)
    mark = fed.mark()
    got = timed_read(path, EIO_WITHIN)
    assert got.ok, got.error
    assert got.md5 == coll["files"]["data.bin"]["md5"]
    served = {r["path"][1:33] for r in keep_gets(fed, mark, "zzzzz") if r["status"] == 200}
    assert served == set(block_hashes(path))
    assert all(r["service"] == second for r in keep_gets(fed, mark, "zzzzz") if r["status"] == 200)
    assert m.stats()["keep_errors"]["cluster=zzzzz"] >= 1  # it did try the dead one
    record("keepstore down (replica up)", outcome="served by the replica", wrong_bytes=0,
           read_seconds=round(got.seconds, 2))  # fmt: skip


def test_both_keepstores_down_is_eio_in_bounded_time_then_reads_resume_without_remount(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 3 * MiB})
    m = mount()
    path = m / f"by_id/{coll['uuid']}/data.bin"
    path.stat()
    for service in ("keep0", "keep1"):
        fed.set_fault("zzzzz", service, down=True)
    got = timed_read(path, EIO_WITHIN)
    assert not got.ok and "Input/output error" in got.error
    assert "Block read error" in m.log.read_text()
    wrong, failed = wrong_bytes_served(path, content(coll, "data.bin"))
    assert failed and wrong == 0
    fed.clear_faults("zzzzz", "keep1")
    recovered = until_readable(path, coll["files"]["data.bin"]["md5"], timeout=60)
    assert m.proc.poll() is None
    record("both keepstores down, then one back", outcome="EIO, then reads resume without remount",
           wrong_bytes=wrong, eio_seconds=round(got.seconds, 2),
           recovery_seconds=round(recovered, 2))  # fmt: skip


def test_remote_cluster_down_fails_its_collections_only_and_its_cached_blocks_keep_serving(
    fed, mount, record
):
    cached = fresh(fed, "zcccc", {"seen.bin": 2 * MiB})
    unseen = fresh(fed, "zcccc", {"unseen.bin": MiB})
    other = fresh(fed, "zbbbb", {"other.bin": 2 * MiB})
    m = mount("--refresh-time", "1")
    seen_path = m / f"by_id/{cached['uuid']}/seen.bin"
    assert timed_read(seen_path).md5 == cached["files"]["seen.bin"]["md5"]
    fed.set_fault("zcccc", "*", down=True)
    time.sleep(1.2)  # the UUID collection is due for a re-check, which fails
    again = timed_read(seen_path, EIO_WITHIN)  # by UUID: the kernel dropped its pages at open
    assert again.ok and again.md5 == cached["files"]["seen.bin"]["md5"], again.error
    started = time.monotonic()
    done = run("ls", str(m / f"by_id/{unseen['uuid']}"), check=False, timeout=EIO_WITHIN)
    eio_seconds = time.monotonic() - started
    assert done.returncode != 0 and "Input/output error" in done.stderr
    lines = [ln for ln in m.log.read_text().splitlines() if unseen["uuid"] in ln]
    assert lines and all("zcccc" in ln for ln in lines), lines
    assert "Traceback" not in m.log.read_text()
    assert run("cat", str(m / f"by_id/{fed.collections['text']['uuid']}/hello.txt")).stdout == "hello world\n"
    assert timed_read(m / f"by_id/{other['uuid']}/other.bin").md5 == other["files"]["other.bin"]["md5"]
    fed.clear_faults("zcccc")
    recovered = until_readable(m / f"by_id/{unseen['uuid']}/unseen.bin", unseen["files"]["unseen.bin"]["md5"],
                               timeout=60)  # fmt: skip
    record("remote cluster down (controller + keepstores)",
           outcome="its new collections EIO with one log line naming it; cached ones and other clusters "
           "serve", wrong_bytes=0, eio_seconds=round(eio_seconds, 2),
           recovery_seconds=round(recovered, 2))  # fmt: skip


def test_corrupt_block_is_refetched_from_the_replica_never_served(fed, mount, record):
    one = fresh(fed, "zzzzz", {"one.bin": 3 * MiB})
    two = fresh(fed, "zzzzz", {"two.bin": 2 * MiB})
    m = mount()
    one_path, two_path = m / f"by_id/{one['uuid']}/one.bin", m / f"by_id/{two['uuid']}/two.bin"
    first, _ = first_choice(fed, "zzzzz", block_hashes(one_path)[0])
    fed.set_fault("zzzzz", first, corrupt=True)
    got = timed_read(one_path, EIO_WITHIN)
    assert got.ok and got.md5 == one["files"]["one.bin"]["md5"], got.error
    assert m.stats()["keep_bad_md5"]
    assert "served bad bytes" in m.log.read_text()
    for service in ("keep0", "keep1"):
        fed.set_fault("zzzzz", service, corrupt=True)
    bad = timed_read(two_path, EIO_WITHIN)
    assert not bad.ok and "Input/output error" in bad.error
    wrong, failed = wrong_bytes_served(two_path, content(two, "two.bin"))
    assert failed and wrong == 0
    fed.clear_faults("zzzzz")
    recovered = until_readable(two_path, two["files"]["two.bin"]["md5"], timeout=60)
    record("corrupt bytes from a keepstore", outcome="md5 mismatch detected, replica used; EIO when "
           "every replica is corrupt", wrong_bytes=wrong, eio_seconds=round(bad.seconds, 2),
           recovery_seconds=round(recovered, 2))  # fmt: skip


def test_stalled_keepstore_is_abandoned_for_the_replica(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": MiB})
    m = mount("--keep-stall-timeout", "3", "--keep-hedge-after", "0")  # the stall failover, unhedged
    path = m / f"by_id/{coll['uuid']}/data.bin"
    first, second = first_choice(fed, "zzzzz", block_hashes(path)[0])
    fed.set_fault("zzzzz", first, stall=True)  # status line and headers, then nothing
    mark = fed.mark()
    got = timed_read(path, 90)
    assert got.ok and got.md5 == coll["files"]["data.bin"]["md5"], got.error
    assert got.seconds < 20, f"a stalled keepstore held the read for {got.seconds:.0f}s (stall timeout 3s)"
    assert [r["service"] for r in keep_gets(fed, mark, "zzzzz") if r["status"] == 200] == [second]
    record("stalled transfer (connection open, no bytes)", outcome="abandoned for the replica",
           wrong_bytes=0, recovery_seconds=round(got.seconds, 2))  # fmt: skip


def test_signatures_expiring_while_a_file_is_open_or_the_mount_idle_are_refreshed(
    federation_factory, mount, record
):
    ttl = 5
    fed = federation_factory(clusters=("zzzzz", "zbbbb"), seed="none", blob_ttl=ttl)
    open_coll = fresh(fed, "zbbbb", {"open.bin": 4 * MiB})
    idle_coll = fresh(fed, "zzzzz", {"idle.bin": 2 * MiB})
    m = mount("--read-ahead-blocks", "1", federation=fed)
    idle_path = m / f"by_id/{idle_coll['portable_data_hash']}/idle.bin"
    idle_path.stat()  # manifest loaded and signed now
    digest = hashlib.md5()
    with open(m / f"by_id/{open_coll['portable_data_hash']}/open.bin", "rb", buffering=0) as f:
        digest.update(f.read(4096))
        time.sleep(ttl + 1.5)  # every signature the mount was given has expired
        started = time.monotonic()
        while chunk := f.read(MiB):
            digest.update(chunk)
        open_seconds = time.monotonic() - started
    assert digest.hexdigest() == open_coll["files"]["open.bin"]["md5"]
    got = timed_read(idle_path, EIO_WITHIN)
    assert got.ok and got.md5 == idle_coll["files"]["idle.bin"]["md5"], got.error
    assert m.stats()["collection_refreshes"] >= 2
    record("signatures expired (open file and idle mount)", outcome="re-signed by refresh, reads continue",
           wrong_bytes=0, open_file_resume_seconds=round(open_seconds, 2),
           idle_read_seconds=round(got.seconds, 2))  # fmt: skip


def test_home_controller_down_after_mounting_keeps_serving_from_keep_and_cache(fed, mount, record):
    local = fresh(fed, "zzzzz", {"local.bin": 2 * MiB})
    remote = fresh(fed, "zbbbb", {"remote.bin": 2 * MiB})
    m = mount("--refresh-time", "1")
    local_path = m / f"by_id/{local['portable_data_hash']}/local.bin"
    remote_path = m / f"by_id/{remote['uuid']}/remote.bin"
    local_path.stat()  # manifest loaded, no block read yet
    assert timed_read(remote_path).md5 == remote["files"]["remote.bin"]["md5"]
    fed.set_fault("zzzzz", "controller", down=True)
    time.sleep(1.2)  # the UUID collection's re-check is due and fails
    fresh_read = timed_read(local_path, EIO_WITHIN)  # blocks from the home keepstores
    assert fresh_read.ok and fresh_read.md5 == local["files"]["local.bin"]["md5"], fresh_read.error
    cached_read = timed_read(remote_path, EIO_WITHIN)  # blocks from the cache
    assert cached_read.ok and cached_read.md5 == remote["files"]["remote.bin"]["md5"], cached_read.error
    started = time.monotonic()
    done = run(*fedmount_cmd("--unmount", str(m.path)), cwd=REPO, check=False, timeout=30)
    unmount_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert not is_mounted(m.path)
    assert m.proc.wait(10) == 0
    record("home controller down after mounting", outcome="mounted collections keep reading from Keep "
           "and cache; --unmount works", wrong_bytes=0,
           unmount_seconds=round(unmount_seconds, 2))  # fmt: skip


def test_sigkilled_daemon_mid_read_fails_readers_and_unmount_clears_it(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"slow.bin": 16 * MiB})
    fed.set_fault("zzzzz", "*", bandwidth=2 * MiB)  # ~8 s to read: the kill lands mid-read
    m = mount()
    path = m / f"by_id/{coll['uuid']}/slow.bin"
    path.stat()
    reader = subprocess.Popen(
        ["dd", f"if={path}", "of=/dev/null", "bs=128k"], stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: m.stats().get("fuse_read_bytes", 0) > 0, 20, "the reader started")
    killed = time.monotonic()
    m.proc.send_signal(signal.SIGKILL)
    try:
        status = reader.wait(30)
    except subprocess.TimeoutExpired:
        reader.kill()
        raise AssertionError("a reader of a SIGKILLed daemon hung") from None
    error_seconds = time.monotonic() - killed
    assert status != 0, "the read finished despite the kill"
    said = reader.stderr.read()
    assert "Transport endpoint is not connected" in said or "Software caused connection abort" in said, said
    m.proc.wait()
    started = time.monotonic()
    run(*fedmount_cmd("--unmount", str(m.path)), cwd=REPO, timeout=30)
    unmount_seconds = time.monotonic() - started
    assert not is_mounted(m.path) and os.listdir(m.path) == []
    fed.clear_faults()
    again = Mount(fed, m.path.parent / "again", "--disk-cache-dir", str(m.cache))
    try:
        assert timed_read(again / f"by_id/{coll['uuid']}/slow.bin").md5 == coll["files"]["slow.bin"]["md5"]
    finally:
        again.stop()
    record("daemon SIGKILLed mid-read", outcome="reader gets an error; --unmount clears the dead mount",
           wrong_bytes=0, reader_error_seconds=round(error_seconds, 2),
           unmount_seconds=round(unmount_seconds, 2))  # fmt: skip


@pytest.fixture
def small_fs(tmp_path):
    """`small_fs(size, read_only=False)`: a fresh tmpfs (root only), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the cache needs root")
    made: list[Path] = []

    def make(size: str, read_only: bool = False) -> Path:
        path = tmp_path / f"fs{len(made)}"
        path.mkdir()
        run("mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs", str(path))
        made.append(path)
        return path

    yield make
    for path in made:
        run("umount", "-l", str(path), check=False)


def cache_warnings(m: Mount) -> list[str]:
    return [ln for ln in m.log.read_text().splitlines() if "WARNING" in ln and "block cache" in ln]


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_unusable_disk_cache_degrades_to_memory_with_one_warning(fed, mount, small_fs, record, trouble):
    cache = small_fs("2m", read_only=trouble == "read-only") / "cache"
    coll = fresh(fed, "zzzzz", {"a.bin": 6 * MiB, "b.bin": 3 * MiB})
    m = mount("--disk-cache-dir", str(cache), "--disk-cache-size", "1G")
    root = m / f"by_id/{coll['uuid']}"
    try:
        for _ in range(2):  # the second time from the memory cache (UUID: no page cache at open)
            for name in ("a.bin", "b.bin"):
                got = timed_read(root / name, EIO_WITHIN)
                assert got.ok and got.md5 == coll["files"][name]["md5"], got.error
        warnings = cache_warnings(m)
        assert len(warnings) == 1 and "memory cache only" in warnings[0], warnings
        assert m.stats()["cache_degraded"] == 1
        assert m.stats()["cache_hits"]["tier=ram"] > 0
    finally:
        m.stop()  # before the tmpfs goes
    record(f"disk cache {trouble}", outcome="degraded to the memory cache, one warning", wrong_bytes=0)


def test_corrupt_disk_cache_entries_are_discarded_and_fetched_again(fed, mount, record):
    coll = fresh(fed, "zzzzz", {"data.bin": 4 * MiB})
    first = mount()
    path = first / f"by_id/{coll['uuid']}/data.bin"
    assert timed_read(path).md5 == coll["files"]["data.bin"]["md5"]
    hashes = block_hashes(path)
    first.stop()
    files = {h: next(first.cache.glob(f"blocks/{h[:2]}/{h}+*")) for h in hashes}
    flipped, cut = files[hashes[1]], files[hashes[2]]
    with open(flipped, "r+b") as f:  # one bit flip in the block's bytes
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    os.truncate(cut, MiB // 2)
    mark = fed.mark()
    second = mount("--disk-cache-dir", str(first.cache))
    path = second / f"by_id/{coll['uuid']}/data.bin"
    wrong, failed = wrong_bytes_served(path, content(coll, "data.bin"))
    assert not failed and wrong == 0
    warnings = cache_warnings(second)
    assert len(warnings) == 2 and all("corrupt" in w for w in warnings), warnings
    assert second.stats()["cache_corrupt"] == 2
    fetched = sorted(r["path"][1:33] for r in keep_gets(fed, mark) if r["status"] == 200)
    assert fetched == sorted([hashes[1], hashes[2]])  # only the bad entries came from Keep again
    record("corrupt disk cache entries (bit flip, truncation)", outcome="entries discarded and fetched "
           "again, one warning each", wrong_bytes=wrong)  # fmt: skip
