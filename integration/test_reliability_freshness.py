"""Freshness and slow APIs on a real mount: what a UUID collection that changes, or a cluster
whose API stalls, costs a reader (issue 12 item 1; issue 13 items 3, 4 and its PDH items).

Each test mounts fedmount for real (FUSE) on the emulated federation, changes a collection
through the real Arvados SDK or shapes a cluster with the emulator's fault controls (a
stalled controller sends its status line and headers, then nothing; a down one resets
connections), and reads through the kernel with real tools and plain ``os.pread``. What
each test asserts:

- a byte is never wrong: every reader's bytes are compared with the version it opened;
- an operation that needs an API that does not answer is bounded by ``--api-wait``, and a
  stalled cluster costs only its own collections.

Time bounds are upper limits with room for a loaded 2-core machine (each says what the
bound is when the machine is quiet). What each scenario measured is appended to
``reliability.jsonl`` (see test_reliability.py) for the README's Reliability table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import arvados.collection
import psutil
import pytest

from integration.cluster.content import Generated
from integration.harness import Federation
from integration.mounting import Recorder, requires_fuse, run, timed_read, wait_for

pytestmark = requires_fuse

MiB = 1 << 20
API_WAIT = 2.0  # --api-wait of these mounts
_names = itertools.count()


@pytest.fixture(scope="session")
def record(tmp_path_factory) -> Recorder:
    return Recorder(tmp_path_factory.getbasetemp() / "reliability.jsonl")


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def timed(*cmd: str, timeout: float = 200) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = run(*cmd, check=False, timeout=timeout)
    return done, time.monotonic() - started


# -- a UUID collection changing under its readers --------------------------------------------


@dataclass
class Versions:
    """The successive contents of one file: same name, same size, new bytes each time."""

    size: int
    seed: str
    contents: list[bytes] = field(default_factory=list)
    published: list[float] = field(default_factory=list)  # monotonic time each one was saved

    def make(self) -> bytes:
        data = Generated(self.size, f"{self.seed}/v{len(self.contents)}").read()
        self.contents.append(data)
        return data

    def index_of(self, data: bytes) -> int | None:
        return next((i for i, c in enumerate(self.contents) if c == data), None)


class Keeper(threading.Thread):
    """A reader that keeps one file open and reads all of it again and again, in random
    order, comparing every byte with the version it opened."""

    def __init__(self, path: Path, expected: bytes, stop: threading.Event):
        super().__init__(daemon=True)
        self.fd = os.open(path, os.O_RDONLY)
        self.expected = expected
        self.stop = stop
        self.read_bytes = 0
        self.wrong_bytes = 0
        self.error: str | None = None

    def run(self) -> None:
        chunk = 128 * 1024
        offsets = list(range(0, len(self.expected), chunk))
        try:
            while not self.stop.is_set():
                random.shuffle(offsets)
                for off in offsets:
                    got = os.pread(self.fd, chunk, off)
                    want = self.expected[off : off + chunk]
                    self.read_bytes += len(got)
                    if got != want:
                        self.wrong_bytes += sum(a != b for a, b in zip(got, want, strict=False))
                        self.wrong_bytes += abs(len(want) - len(got))
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            os.close(self.fd)


class Churner(threading.Thread):
    """A reader that opens the file, reads it whole and closes it, again and again; each
    read is recorded as (open time, version index or None for a mix of versions)."""

    def __init__(self, path: Path, versions: Versions, stop: threading.Event):
        super().__init__(daemon=True)
        self.path = path
        self.versions = versions
        self.stop = stop
        self.reads: list[tuple[float, int | None, int]] = []  # (opened, version, wrong bytes)
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                opened = time.monotonic()
                with open(self.path, "rb") as f:
                    data = f.read()
                index = self.versions.index_of(data)
                wrong = 0 if index is not None else min(  # bytes of the nearest version it got wrong
                    sum(a != b for a, b in zip(data, c, strict=False)) for c in self.versions.contents
                )
                self.reads.append((opened, index, wrong))
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"


def save_version(api, uuid: str, name: str, data: bytes) -> None:
    """Replace file `name` of collection `uuid` as arv-put --update-collection does: the SDK
    writes the blocks to Keep and saves the collection's new manifest."""
    coll = arvados.collection.Collection(uuid, api_client=api)
    with coll.open(name, "wb") as f:
        f.write(data)
    coll.save()


def test_uuid_collection_updated_while_open_never_mixes_versions(fed, mount, sdk, record):
    """Issue 12 item 1: a file of a UUID collection replaced (same name, same size) while
    readers hold it open and others keep opening it, over several updates."""
    refresh, updates, size = 1.0, 4, 16 * MiB
    versions = Versions(size, unique("freshness"))
    coll = fed.add_collection("zzzzz", versions.seed, {"data.bin": versions.make()}, block_size=4 * MiB)
    versions.published.append(time.monotonic())
    api = sdk("zzzzz")
    m = mount("--refresh-time", str(refresh), "--api-wait", str(API_WAIT))
    path = m / f"by_id/{coll['uuid']}/data.bin"
    stop = threading.Event()
    keepers = [Keeper(path, versions.contents[0], stop)]  # opened at v0, kept open throughout
    churners = [Churner(path, versions, stop) for _ in range(3)]
    new_opens: list[tuple[int, str]] = []  # (version expected, md5sum of a new open)
    read_by_then: list[list[int]] = []  # bytes each kept-open reader had read when a version was saved
    for reader in keepers + churners:
        reader.start()
    try:
        for k in range(1, updates + 1):
            time.sleep(1.0)  # the readers fill the page cache with the current version
            save_version(api, coll["uuid"], "data.bin", versions.make())
            versions.published.append(time.monotonic())
            read_by_then.append([r.read_bytes for r in keepers])
            time.sleep(refresh + 1.0)  # past --refresh-time: the next touch re-checks
            got = timed_read(path, 60)
            assert got.ok, got.error
            new_opens.append((k, got.md5))
            keeper = Keeper(path, versions.contents[k], stop)  # opened at v_k, kept open
            keeper.start()
            keepers.append(keeper)
        time.sleep(1.0)
    finally:
        stop.set()
        for reader in keepers + churners:
            reader.join(60)
    assert [r.error for r in keepers + churners] == [None] * (len(keepers) + len(churners))
    expected = [(k, hashlib.md5(versions.contents[k]).hexdigest()) for k in range(1, updates + 1)]
    assert new_opens == expected, "a new open after --refresh-time did not read the version saved"
    keeper_wrong = [r.wrong_bytes for r in keepers]
    assert keeper_wrong == [0] * len(keepers), "a reader kept open saw bytes of another version"
    # Each kept-open reader read its file whole again after the next version was saved.
    read_after = [keepers[j].read_bytes - read_by_then[j][j] for j in range(updates)]
    assert min(read_after) >= size, read_after
    reads = [read for c in churners for read in c.reads]
    mixed = [read for read in reads if read[1] is None]
    assert not mixed, f"{len(mixed)} of {len(reads)} whole-file reads mixed two versions"
    # An open well after a version was saved (past --refresh-time, with slack) reads it or a newer one.
    slack = refresh + 1.0
    stale = [(opened, index) for opened, index, _ in reads
             if index is not None and any(index < k and opened > t + slack
                                          for k, t in enumerate(versions.published))]
    assert not stale, f"{len(stale)} new opens read a version older than one saved {slack:g}s before"
    assert m.proc.poll() is None and "Traceback" not in m.log.read_text()
    record("UUID collection updated while open (4 updates, same name and size)",
           outcome="kept-open readers read only their version; every new open after --refresh-time the new "
           "one, never a mix", wrong_bytes=sum(keeper_wrong) + sum(w for _, _, w in reads),
           keepers=len(keepers), whole_file_reads=len(reads),
           keeper_bytes_read=sum(r.read_bytes for r in keepers))  # fmt: skip


# -- a stalled cluster ---------------------------------------------------------------------


def small_collections(fed: Federation, cluster: str, count: int) -> list[dict]:
    return [fed.add_collection(cluster, unique(f"small-{cluster}"), {"x.txt": f"{cluster} {i}\n"})
            for i in range(count)]  # fmt: skip


def readable(path: Path) -> bool:
    try:
        return path.exists()
    except TimeoutError:  # ETIMEDOUT: still loading
        return False


def test_stalled_lookup_costs_only_its_own_ids(fed, mount, record):
    """Issue 13 item 3: lookups of collections of a cluster whose API stalls (the home
    controller forwards to it and gets headers, then nothing) beside lookups of others."""
    stuck = small_collections(fed, "zbbbb", 3)
    others = small_collections(fed, "zcccc", 1) + small_collections(fed, "zzzzz", 1)
    m = mount("--api-wait", str(API_WAIT))
    fed.set_fault("zbbbb", "controller", stall=True)
    mark = fed.mark()
    started = time.monotonic()
    stuck_stats = [subprocess.Popen(["stat", str(m / f"by_id/{c['uuid']}")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for c in stuck]  # fmt: skip
    time.sleep(0.3)  # they are in the kernel: the first is the daemon's, the others queue behind it
    other_seconds = []
    for c in others:
        done, seconds = timed("stat", "-c", "%i", str(m / f"by_id/{c['uuid']}"))
        assert done.returncode == 0, done.stderr
        other_seconds.append(seconds)
    stuck_seconds, errors = [], []
    for p in stuck_stats:
        p.wait(200)
        stuck_seconds.append(time.monotonic() - started)
        errors.append(p.stderr.read())
    # Quiet: the first stuck lookup takes --api-wait (2 s), the others answer at once, and
    # the other clusters' lookups wait for the first one's answer (the kernel serializes).
    assert max(other_seconds) < 10, f"lookups of other clusters took {other_seconds} (api-wait {API_WAIT:g}s)"
    assert max(stuck_seconds) < 10, f"the stalled cluster's lookups took {stuck_seconds}"
    assert all("Connection timed out" in e for e in errors), errors
    fed.clear_faults("zbbbb")  # the stalled answers are released: the calls finish in the background

    def asked() -> list[dict]:
        return [r for r in fed.requests(mark, cluster="zzzzz", service="controller")
                if any(c["uuid"] in r["path"] for c in stuck)]  # fmt: skip

    wait_for(lambda: len(asked()) >= 3, 30, "the stalled requests were answered")
    wait_for(lambda: all(readable(m / f"by_id/{c['uuid']}/x.txt") for c in stuck), 10, "loaded")
    assert [(m / f"by_id/{c['uuid']}/x.txt").read_text() for c in stuck] == [f"zbbbb {i}\n" for i in range(3)]
    # One call per id, whose lookups all joined it: its stalled attempt (the emulator answers
    # it 502 when the stall is cleared) and the client's retry.
    assert len(asked()) <= 2 * len(stuck), [(r["path"], r["status"]) for r in asked()]
    assert m.stats()["api_calls_late"] == {"cluster=zbbbb,op=lookup": 3}
    record("one cluster's API stalled (lookups of 3 of its collections, 2 of others)",
           outcome="its lookups ETIMEDOUT after --api-wait, the others answer; the stalled answers "
           "serve the next lookup", wrong_bytes=0, api_wait=API_WAIT,
           stalled_lookup_seconds=round(max(stuck_seconds), 2),
           other_lookup_seconds=round(max(other_seconds), 2))  # fmt: skip


@pytest.mark.parametrize("trouble", ["stalled", "down"])
def test_stalled_home_controller_costs_a_mounted_uuid_collection_one_wait_per_recheck(
    fed, mount, record, trouble
):
    """Issue 13 item 4: the home controller stalls (or is down) after a UUID collection was
    loaded; every refresh makes its re-check due while readers stat, list, open and read."""
    refresh = 1.0
    coll = fed.add_collection("zzzzz", unique("recheck"), {"a.bin": (2 * MiB, "a"), "b.bin": (MiB, "b")})
    m = mount("--refresh-time", str(refresh), "--api-wait", str(API_WAIT))
    root = m / f"by_id/{coll['uuid']}"
    md5 = {name: coll["files"][name]["md5"] for name in ("a.bin", "b.bin")}
    assert timed_read(root / "a.bin").md5 == md5["a.bin"]
    open_file = open(root / "b.bin", "rb")  # noqa: SIM115  (read across the whole outage)
    fed.set_fault("zzzzz", "controller", **({"stall": True} if trouble == "stalled" else {"down": True}))
    seconds: dict[str, list[float]] = {"stat": [], "ls": [], "cat": [], "read": []}
    wrong = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < 12:  # a dozen refreshes
            time.sleep(refresh * 0.6)
            for op, cmd in (("stat", ["stat", str(root / "a.bin")]), ("ls", ["ls", "-l", str(root)])):
                done, took = timed(*cmd, timeout=120)
                assert done.returncode == 0, done.stderr
                seconds[op].append(took)
            got = timed_read(root / "a.bin", 120)
            assert got.ok, got.error
            wrong += 0 if got.md5 == md5["a.bin"] else 1
            seconds["cat"].append(got.seconds)
            t = time.monotonic()
            open_file.seek(0)
            wrong += 0 if hashlib.md5(open_file.read()).hexdigest() == md5["b.bin"] else 1
            seconds["read"].append(time.monotonic() - t)
    finally:
        open_file.close()
        fed.clear_faults("zzzzz")
    worst = {op: round(max(s), 2) for op, s in seconds.items()}
    total = round(sum(sum(s) for s in seconds.values()), 2)
    assert wrong == 0
    # Quiet: an operation waits at most --api-wait (2 s) once per re-check, and while a stalled
    # re-check is pending no operation waits; reads of an open file never wait.
    assert max(worst.values()) < 10, f"worst operation times {worst} (--api-wait {API_WAIT:g}s)"
    assert worst["read"] < 5, worst
    assert total < 40, f"{total}s for {sum(map(len, seconds.values()))} operations in 12 s"
    assert m.proc.poll() is None
    record(f"home controller {trouble} while a UUID collection is mounted and read",
           outcome="every stat, ls, cat and read answered from the version mounted; at most --api-wait "
           "per re-check", wrong_bytes=0, api_wait=API_WAIT, worst_seconds=worst,
           operations=sum(map(len, seconds.values())), total_seconds=total)  # fmt: skip


# -- what a PDH stands for -----------------------------------------------------------------


def test_every_spelling_of_a_pdh_loads_one_collection(fed, mount, record):
    """Issue 13: ``hash+size+ANYTHING`` and ``hash+0size`` each loaded their own copy."""
    files = {f"d{i // 1000}/file-with-a-long-name-{i:06d}.txt": f"{i}\n" for i in range(10_000)}
    coll = fed.add_collection("zbbbb", unique("aliases"), files)
    pdh = coll["portable_data_hash"]
    digest, size = pdh.split("+")
    spellings = [pdh, f"{digest}+0{size}", f"{digest}+00{size}"] + [f"{pdh}+K{i:04d}" for i in range(100)]
    m = mount()
    daemon = psutil.Process(m.proc.pid)
    mark = fed.mark()
    assert (m / f"by_id/{pdh}/d0/file-with-a-long-name-000000.txt").read_text() == "0\n"
    before = daemon.memory_info().rss
    inodes = {os.stat(m / f"by_id/{name}").st_ino for name in spellings}
    texts = {(m / f"by_id/{name}/d9/file-with-a-long-name-009999.txt").read_text() for name in spellings}
    grown = daemon.memory_info().rss - before
    assert texts == {"9999\n"} and len(inodes) == 1
    asked = [r for r in fed.requests(mark, cluster="zzzzz", service="controller") if digest in r["path"]]
    assert len(asked) == 1, [r["path"] for r in asked]  # fedmount's one request (the home fans it out)
    assert grown < 10 * MiB, f"the daemon grew {grown / MiB:.1f} MiB for {len(spellings)} spellings"
    assert os.listdir(m / "by_id") == ["README", pdh]
    record("one PDH asked for under 103 spellings (hints, leading zeros)", outcome="one collection loaded, "
           "one API call, one inode", wrong_bytes=0, rss_growth_mib=round(grown / MiB, 1))  # fmt: skip


def test_uuid_record_claiming_a_pdh_its_manifest_does_not_hash_to_is_refused(fed, mount, record):
    """Issue 13: the PDH a UUID record claims was shown (xattr, .arvados#collection) unchecked."""
    honest = fed.add_collection("zbbbb", unique("honest"), {"a.txt": "the real content\n"})
    liar = fed.add_collection("zbbbb", unique("liar"), {"a.txt": "other content!!!\n"},
                              claim_pdh=honest["portable_data_hash"])  # fmt: skip
    m = mount()
    done, seconds = timed("ls", str(m / f"by_id/{liar['uuid']}"), timeout=60)
    assert done.returncode != 0 and "Input/output error" in done.stderr
    [line] = [ln for ln in m.log.read_text().splitlines() if liar["uuid"] in ln]
    assert "ERROR" in line and "zbbbb" in line
    assert f"claims portable data hash {honest['portable_data_hash']}" in line and "hashes to" in line
    got = os.getxattr(m / f"by_id/{honest['uuid']}", "user.arvados.portable_data_hash").decode()
    assert got == honest["portable_data_hash"]
    record("a UUID record claims a PDH its manifest does not hash to", outcome="refused: EIO, one log line "
           "naming the collection, the cluster and both hashes", wrong_bytes=0,
           eio_seconds=round(seconds, 2))  # fmt: skip


def test_recheck_of_a_collection_with_a_large_description_transfers_only_what_decides_freshness(
    fed, mount, sdk, record
):
    """Issue 13: each re-check re-downloaded every kept field (a 20 MB description)."""
    coll = fed.add_collection("zzzzz", unique("described"), {"a.txt": "content\n"})
    api = sdk("zzzzz")
    api.collections().update(uuid=coll["uuid"], body={"description": "x" * (4 * MiB)}).execute()
    refresh = 1.0
    m = mount("--refresh-time", str(refresh))
    root = m / f"by_id/{coll['uuid']}"
    assert (root / "a.txt").read_text() == "content\n"
    mark = fed.mark()
    for _ in range(4):
        time.sleep(refresh + 0.2)
        assert (root / "a.txt").read_text() == "content\n"  # each one re-checks
    rechecks = [r for r in fed.requests(mark, cluster="zzzzz", service="controller")
                if coll["uuid"] in r["path"]]  # fmt: skip
    assert len(rechecks) >= 3 and max(r["bytes"] for r in rechecks) < 1000, [r["bytes"] for r in rechecks]
    api.collections().update(uuid=coll["uuid"], body={"name": coll["uuid"] + " renamed"}).execute()
    time.sleep(refresh + 0.2)
    os.stat(root / "a.txt")  # the re-check sees the new modification time: the other fields follow
    shown = json.loads((root / ".arvados#collection").read_text())
    assert shown["name"] == coll["uuid"] + " renamed" and len(shown["description"]) == 4 * MiB
    record("re-checks of a UUID collection with a 4 MiB description", outcome="about 200 bytes each; "
           "the other fields fetched again only when the record changed", wrong_bytes=0,
           recheck_bytes=max(r["bytes"] for r in rechecks))  # fmt: skip
