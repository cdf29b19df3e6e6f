"""What the benchmark does to a mounted filesystem, and how it mounts one.

Every workload is a plain tool or a plain read loop against a path, so the same code reads
fedmount, the null filesystem (`bench.nullfs`) and a local file, and a figure and its
ceiling are measured the same way:

- sequential reads are ``dd if=FILE of=/dev/null bs=READ_SIZE`` and the figure is dd's own
  byte count and time (its clock starts after the open, so process start-up is not in
  it); the file is stat'ed first, so metadata lookups are not in it either;
- random reads are ``os.pread`` at offsets drawn with a fixed seed, aligned to the read
  size, over one open descriptor;
- the metadata walk is ``find DIR -printf '%s %m\\n'`` (a stat of every entry);
- the long listing is ``ls -l DIR``: a stat of every entry, and the ``security.selinux`` and
  ``system.posix_acl_access`` extended attributes coreutils asks of each unless the
  filesystem says it does not support them;
- the small-file read is ``xargs -0 cat`` over a known list of paths;
- time to first byte is open + a 1-byte read of a file whose metadata is already known;
- a project listing is ``ls -l`` of a project directory (the first in a fresh mount, or the
  second), a tree walk ``find -maxdepth 2`` of a project of projects (`TREE_FIND`), and the
  RSS per listed entry the daemon's growth over one ``ls -l`` of a project;
- staging is ``fedmount stage --to-cluster X --save-as NAME`` (`Stager`), timed whole.

`Mount` runs a FUSE daemon as a foreground subprocess, waits until a path inside the mount
exists, and unmounts with ``fusermount3 -u`` when done (then ``-u -z`` if the daemon will
not let go). `drop_page_cache` empties the kernel page cache for cold runs when root.

The workload functions are written against `Subject`: something that can open fresh mounts
of a filesystem (fedmount, the null filesystem, or the real arv-mount as fedmount's peer,
`bench.arvmount`), cold (fresh disk cache, page cache dropped) or warm (the disk cache of
earlier runs; `CacheDirs` keeps both kinds of directory), and tell where a collection's
file is in them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DD_RE = re.compile(r"^(\d+) bytes .* copied, ([0-9.e+-]+) s,", re.MULTILINE)


class BenchError(Exception):
    """A step of the benchmark could not run; the message is one line saying which and why."""


class TooSlow(BenchError):
    """A step did not finish within its time limit; the message says how far it got."""


# --- mounting ----------------------------------------------------------------------------


class Mount:
    """A FUSE daemon run in the foreground as a subprocess; a context manager.

    Entering starts `argv` (stdout and stderr to `log_path`) and waits until `ready` (a
    path relative to the mountpoint, "" for the mount itself) exists inside a mounted
    `mountpoint`. Leaving unmounts and waits for the daemon to exit."""

    def __init__(
        self,
        argv: Sequence[str],
        mountpoint: str,
        log_path: str,
        *,
        ready: str = "",
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.argv = list(argv)
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.ready = ready
        self.env = env
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Mount:
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.timeout
        target = os.path.join(self.mountpoint, self.ready)
        while not (os.path.ismount(self.mountpoint) and os.path.exists(target)):
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.argv[0]} exited with status {self.process.returncode} before "
                    f"{target} appeared: {last_line(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise BenchError(f"{target} did not appear within {self.timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)

    def rss(self) -> int:
        """Resident memory of the daemon and its children, in bytes."""
        return process_rss(self.pid)


def process_rss(pid: int) -> int:
    """Resident memory of process `pid` and its children, in bytes."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def python_path_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH (for ``python -m fedmount`` and nullfs)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


def last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def drop_page_cache() -> bool:
    """Write back and drop the kernel page cache; False if not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# --- readers -----------------------------------------------------------------------------


def dd_read(path: str, read_size: int, expect: int) -> float:
    """Seconds dd took to read all of `path` (which must be `expect` bytes) in `read_size` reads."""
    os.stat(path)
    out = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", f"bs={read_size}"],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    if out.returncode != 0:
        raise BenchError(f"dd of {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    m = DD_RE.search(out.stderr)
    if m is None:
        raise BenchError(f"cannot parse dd output: {out.stderr.strip()!r}")
    if int(m.group(1)) != expect:
        raise BenchError(f"dd read {m.group(1)} bytes of {path}, expected {expect}")
    return float(m.group(2))


def random_offsets(size: int, read_size: int, count: int, seed: int = 0) -> list[int]:
    """`count` offsets, multiples of `read_size`, each with a full read inside a `size`-byte file."""
    slots = size // read_size
    if slots < 1:
        raise BenchError(f"file of {size} bytes is smaller than one {read_size}-byte read")
    rng = random.Random(seed)
    return [rng.randrange(slots) * read_size for _ in range(count)]


def random_read(path: str, offsets: Sequence[int], read_size: int) -> float:
    """Seconds taken by one pread of `read_size` at each offset, over one open descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, read_size, off)) != read_size:
                raise BenchError(f"short read of {path} at {off}")
        return time.perf_counter() - start
    finally:
        os.close(fd)


def find_stat(
    directory: str, expect_entries: int, timeout: float | None = None, tests: Sequence[str] = ()
) -> float:
    """Seconds for ``find DIR [TESTS] -printf`` to stat every entry; checks it saw
    `expect_entries`. Raises `TooSlow` if it takes more than `timeout` seconds."""
    start = time.perf_counter()
    argv = ["find", directory, *tests, "-printf", "%s %m\n"]
    try:
        out = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        seen = (exc.stdout or b"").count(b"\n")
        raise TooSlow(f"find listed {seen:,} of {expect_entries:,} entries in {timeout:.0f} s") from None
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise BenchError(f"find {directory} failed: {out.stderr.decode(errors='replace').strip()[:200]}")
    seen = out.stdout.count(b"\n")
    if seen != expect_entries:
        raise BenchError(f"find {directory} saw {seen} entries, expected {expect_entries}")
    return elapsed


def ls_long(directory: str, expect_entries: int, timeout: float | None = None) -> float:
    """Seconds for ``ls -l DIR``; checks it listed `expect_entries` entries. Raises `TooSlow`
    if it takes more than `timeout` seconds."""
    start = time.perf_counter()
    try:
        out = subprocess.run(
            ["ls", "-l", directory], capture_output=True, env={**os.environ, "LC_ALL": "C"}, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise TooSlow(f"ls -l of {expect_entries:,} entries took over {timeout:.0f} s") from None
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise BenchError(f"ls -l {directory} failed: {out.stderr.decode(errors='replace').strip()[:200]}")
    seen = out.stdout.count(b"\n") - 1  # the first line is "total N"
    if seen != expect_entries:
        raise BenchError(f"ls -l {directory} listed {seen} entries, expected {expect_entries}")
    return elapsed


def cat_files(paths: Sequence[str], expect_bytes: int) -> float:
    """Seconds for ``xargs -0 cat`` to read every path; checks the byte count."""
    listing = b"".join(os.fsencode(p) + b"\0" for p in paths)
    start = time.perf_counter()
    out = subprocess.run(["sh", "-c", "xargs -0 cat | wc -c"], input=listing, capture_output=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0 or int(out.stdout or 0) != expect_bytes:
        raise BenchError(
            f"cat of {len(paths)} files read {out.stdout.strip().decode() or 0} bytes, "
            f"expected {expect_bytes}: {out.stderr.decode(errors='replace').strip()[:200]}"
        )
    return elapsed


def first_byte(path: str) -> float:
    """Seconds from open to the first byte read of `path`."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if len(os.read(fd, 1)) != 1:
            raise BenchError(f"{path} is empty")
        return time.perf_counter() - start
    finally:
        os.close(fd)


# --- the filesystem under test -----------------------------------------------------------


@dataclass
class BenchCollection:
    """A benchmark collection as created in the federation: where it lives and its files."""

    name: str
    uuid: str
    cluster: str
    files: dict[str, int]
    portable_data_hash: str = ""
    entries: int = field(init=False)

    def __post_init__(self) -> None:
        dirs = set()
        for path in self.files:
            d = os.path.dirname(path)
            while d and d not in dirs:
                dirs.add(d)
                d = os.path.dirname(d)
        self.entries = len(self.files) + len(dirs) + 1  # + the collection directory itself

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


class Mounted(Protocol):
    """A running mount: where it is and what its daemon holds in memory (a `Mount`, or the
    peer's own mount, `bench.arvmount`)."""

    mountpoint: str

    def rss(self) -> int: ...


class Subject(Protocol):
    """A filesystem the benchmark measures. `mount` gives a fresh mount (a context manager
    yielding a `Mounted`): cold = empty disk cache and page cache dropped; warm = the disk
    cache that earlier warm mounts filled. Collections are at ``MOUNT/by_id/UUID/``."""

    name: str

    def mount(self, *, cold: bool) -> AbstractContextManager[Mounted]: ...


class CacheDirs:
    """A subject's disk cache directories under `workdir`: one shared by every warm mount, and
    a fresh one per cold mount, removed when that mount ends; `drop` empties the page cache."""

    def __init__(self, workdir: str, drop: Callable[[], object] = drop_page_cache) -> None:
        self.workdir = workdir
        self.drop = drop
        self.warm = os.path.join(workdir, "warm-cache")
        self.cold_mounts = 0

    @contextmanager
    def for_mount(self, *, cold: bool) -> Iterator[str]:
        """The directory for one mount; for a cold one, the page cache is dropped first."""
        if not cold:
            yield self.warm
            return
        self.cold_mounts += 1
        cache = os.path.join(self.workdir, f"cold-cache-{self.cold_mounts}")
        self.drop()
        try:
            yield cache
        finally:
            shutil.rmtree(cache, ignore_errors=True)


def collection_path(
    mount: Mounted, collection: BenchCollection, path: str = "", *, by_pdh: bool = False
) -> str:
    """Where `path` of `collection` is in a mount: ``by_id/UUID/path`` (or ``by_id/PDH/path``)."""
    cid = collection.portable_data_hash if by_pdh else collection.uuid
    return os.path.join(mount.mountpoint, "by_id", cid, path)


class FedmountSubject:
    """fedmount itself: ``fedmount --foreground`` against the federation's home cluster."""

    name = "fedmount"

    def __init__(
        self,
        env: dict[str, str],
        workdir: str,
        read_ahead_kb: int,
        fedmount: str,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.env = env  # ARVADOS_API_HOST, ARVADOS_API_TOKEN and the CA of the home cluster
        self.workdir = workdir
        self.read_ahead_kb = read_ahead_kb
        self.fedmount = list(fedmount)
        self.extra_args = list(extra_args)
        self.caches = CacheDirs(workdir)

    @contextmanager
    def mount(self, *, cold: bool) -> Iterator[Mount]:
        mountpoint = os.path.join(self.workdir, "mnt")
        with self.caches.for_mount(cold=cold) as cache:
            argv = [
                *self.fedmount,
                "--foreground",
                "--read-ahead-kb",
                str(self.read_ahead_kb),
                "--disk-cache-dir",
                cache,
                *self.extra_args,
                mountpoint,
            ]
            log = os.path.join(self.workdir, "fedmount.log")
            with Mount(argv, mountpoint, log, ready="by_id/README", env=self.env) as m:
                yield m


# --- the workloads: each returns one sample per run --------------------------------------


def sequential(
    subject: Subject, c: BenchCollection, path: str, read_size: int, runs: int, *, cold: bool
) -> list[float]:
    """Bytes/s of ``dd`` of one file, a fresh mount per run (cold: fresh disk cache too)."""
    size = c.files[path]
    if not cold:
        with subject.mount(cold=False) as m:  # fill the disk cache
            dd_read(collection_path(m, c, path), read_size, size)
    samples = []
    for _ in range(runs):
        with subject.mount(cold=cold) as m:
            samples.append(size / dd_read(collection_path(m, c, path), read_size, size))
    return samples


def second_read(
    subject: Subject, c: BenchCollection, path: str, read_size: int, runs: int, *, by_pdh: bool = False
) -> list[float]:
    """Bytes/s of the second ``dd`` of a file in the same mount (reached by UUID or by PDH)."""
    size = c.files[path]
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            dd_read(collection_path(m, c, path, by_pdh=by_pdh), read_size, size)
            samples.append(size / dd_read(collection_path(m, c, path, by_pdh=by_pdh), read_size, size))
    return samples


def random_reads(
    subject: Subject, c: BenchCollection, path: str, read_size: int, count: int, runs: int
) -> list[float]:
    """Reads/s of `count` preads of `read_size` at random aligned offsets; warm disk cache, fresh mount."""
    offsets = random_offsets(c.files[path], read_size, count)
    with subject.mount(cold=False) as m:  # fill the disk cache
        dd_read(collection_path(m, c, path), 1 << 20, c.files[path])
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            samples.append(count / random_read(collection_path(m, c, path), offsets, read_size))
    return samples


def metadata_walk(
    subject: Subject, c: BenchCollection, runs: int, timeout: float | None = None
) -> list[float]:
    """Seconds for find + stat of every entry of a collection, from a mount that just became
    ready; `TooSlow` if a walk takes more than `timeout` seconds."""
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            samples.append(find_stat(collection_path(m, c), c.entries, timeout))
    return samples


def long_listing(subject: Subject, c: BenchCollection, runs: int) -> list[float]:
    """Seconds for ``ls -l`` of a collection whose files are all in its top directory, the second
    listing in a fresh mount (the first one loaded the collection), a fresh mount per run."""
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            ls_long(collection_path(m, c), len(c.files))
            samples.append(ls_long(collection_path(m, c), len(c.files)))
    return samples


def small_files(subject: Subject, c: BenchCollection, runs: int, *, cold: bool) -> list[float]:
    """Files/s of ``cat`` of every file of a collection (its directory stat'ed first)."""
    if not cold:
        with subject.mount(cold=False) as m:
            cat_files([collection_path(m, c, p) for p in c.files], c.total_bytes)
    samples = []
    for _ in range(runs):
        with subject.mount(cold=cold) as m:
            os.stat(collection_path(m, c))
            paths = [collection_path(m, c, p) for p in c.files]
            samples.append(len(paths) / cat_files(paths, c.total_bytes))
    return samples


def time_to_first_byte(subject: Subject, c: BenchCollection, path: str, runs: int) -> list[float]:
    """Seconds from open to the first byte of a file none of whose blocks is cached (its stat done)."""
    samples = []
    for _ in range(runs):
        with subject.mount(cold=True) as m:
            os.stat(collection_path(m, c, path))
            samples.append(first_byte(collection_path(m, c, path)))
    return samples


def daemon_rss(
    subject: Subject, c: BenchCollection, runs: int, timeout: float | None = None
) -> tuple[list[float], list[float]]:
    """(RSS after listing every entry of the collection with find, RSS of the idle mount before),
    bytes; `TooSlow` if a listing takes more than `timeout` seconds."""
    listed, idle = [], []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            idle.append(float(m.rss()))
            find_stat(collection_path(m, c), c.entries, timeout)
            listed.append(float(m.rss()))
    return listed, idle


def project_listing(
    subject: Subject, project: str, entries: int, runs: int, *, warm: bool, timeout: float | None = None
) -> list[float]:
    """Seconds for ``ls -l`` of the project directory `project` (relative to the mount), the
    first listing of a fresh mount or, `warm`, the second (the first one filled the kernel's
    and the daemon's caches), a fresh mount per run."""
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            path = os.path.join(m.mountpoint, project)
            if warm:
                ls_long(path, entries, timeout)
            samples.append(ls_long(path, entries, timeout))
    return samples


# ``find`` of a project tree down to its collections, not into them (their files are not the
# listing's), and without the ``.arvados#project`` records, which not every filesystem serves.
TREE_FIND = ("-maxdepth", "2", "-not", "-name", ".*")


def tree_walk(
    subject: Subject, tree: str, entries: int, runs: int, timeout: float | None = None
) -> list[float]:
    """Seconds for `TREE_FIND` of the project directory `tree` (a project of projects of
    collections, relative to the mount) from a fresh mount, a fresh mount per run."""
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            samples.append(find_stat(os.path.join(m.mountpoint, tree), entries, timeout, TREE_FIND))
    return samples


def listed_rss_per_entry(
    subject: Subject, project: str, entries: int, runs: int, timeout: float | None = None
) -> list[float]:
    """Bytes the daemon's RSS grew by per entry listed, by ``ls -l`` of the project directory
    `project` (relative to the mount) in a fresh mount, a fresh mount per run. ``ls -l`` of
    the project's parent comes first, so what the first listing of a mount costs whatever its
    size (code paths run once, connections, the parent's entries) is not counted per entry."""
    samples = []
    for _ in range(runs):
        with subject.mount(cold=False) as m:
            path = os.path.join(m.mountpoint, project)
            subprocess.run(["ls", "-l", os.path.dirname(path)], capture_output=True, check=True)
            before = m.rss()
            ls_long(path, entries, timeout)
            samples.append((m.rss() - before) / entries)
    return samples


@dataclass
class Stager:
    """``fedmount stage --to-cluster CLUSTER --save-as NAME`` of one collection, each run with a
    fresh cache directory (where stage records the blocks it copied), so every run copies
    every block; `saved` is the collection the last run saved on CLUSTER."""

    fedmount: Sequence[str]
    env: dict[str, str]
    workdir: str
    cluster: str
    threads: int
    saved: BenchCollection | None = None
    runs: int = 0

    def samples(self, c: BenchCollection, runs: int) -> list[float]:
        """Bytes/s of staging `c` (one file, data.bin, is what the saved collection is read for)."""
        samples = []
        for _ in range(runs):
            self.runs += 1
            cache = os.path.join(self.workdir, f"stage-cache-{self.runs}")
            argv = [*self.fedmount, "stage", "--to-cluster", self.cluster, "--save-as",
                    f"{c.name} staged {self.runs}", "--json", "--quiet", "--concurrency",
                    str(self.threads), "--disk-cache-dir", cache, c.uuid]  # fmt: skip
            start = time.perf_counter()
            try:
                out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=3600)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            elapsed = time.perf_counter() - start
            if out.returncode != 0:
                raise BenchError(f"stage exited with {out.returncode}: {(out.stderr.strip() or '?')[-200:]}")
            saved = json.loads(out.stdout)["saved"]
            self.saved = BenchCollection(saved["name"], saved["uuid"], self.cluster, c.files,
                                         saved.get("portable_data_hash", ""))  # fmt: skip
            samples.append(c.total_bytes / elapsed)
        return samples
