"""The daemon's life: check, (fork,) connect, mount, serve, unmount.

Start-up, in order, so that every failure is one line *before* anything is mounted:

1. client settings (`Settings.from_environment`);
2. the mount point: a FUSE mount already there is refused, or with ``--replace``
   unmounted first (which also clears a dead one); then it must be an empty directory,
   unless ``--nonempty`` (libfuse 2 and arv-mount refuse to hide files; libfuse 3 does
   not check, so fedmount does);
3. without ``--foreground``/``--exec``, fork: the parent waits on a pipe and exits 0
   once the child writes "ready", or prints the child's one-line reason and exits 1.
   The child logs to stderr and to its log file (``--logfile``, else `daemon_log`'s
   file named after the mount point) until it is ready, then to the file only;
4. the soft limit of open files is raised to the hard limit, as arv-mount raises it (a
   daemon serving many readers, blocks and connections must not hit EMFILE first);
   `Federation.connect` (a wrong token or an unreachable home cluster stops here; so does
   ``--route direct`` with a v1 token that could not be made v2), the block layers,
   `Tree.start` (``--collection`` must exist);
5. `fuse.mount`, then the FUSE loop; the mount is "ready" once a ``stat`` of the mount
   point made from a worker thread has been answered by that loop: only then does
   ``by_id/README`` appear, is the "mounted" line (naming the log file) logged, and does
   the parent get "ready";
6. SIGINT/SIGTERM end the loop (with ``--exec`` they are forwarded to the command, whose
   exit ends it); the mount is then unmounted (lazily: a busy mount point detaches);
7. the Keep throughput this daemon observed per cluster is folded into the cache
   directory's `ThroughputBook`, which ``fedmount locate`` estimates from.

`unmount` needs no API client, so it works when the API is unreachable, and it clears a
dead mount ("Transport endpoint is not connected") as arv-mount does: write 1 to the
connection's ``/sys/fs/fuse/connections/<minor>/abort`` (mounting fusectl there first if
needed and allowed), ``fusermount3 -u -z`` (``umount -l`` as root if that fails), and
repeat until the path is gone from /proc/self/mountinfo, within ``--unmount-timeout``.
It never ``stat``\\s the mount point, which would hang on a hung daemon. A path that is
not mounted is an error (exit 1), as for ``fusermount3 -u``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import trio

from fedmount.api.controller import DEFAULT_MAX_ANSWER
from fedmount.api.federation import Federation
from fedmount.arvados.errors import ApiError
from fedmount.arvados.settings import Settings, SettingsError
from fedmount.arvados.tokens import V2_NEEDED
from fedmount.blocks.cache import BlockCache, default_cache_dir, default_disk_cache_size
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.prefetch import DEFAULT_PREFETCH_BLOCKS, BlockReader
from fedmount.blocks.throughput import ThroughputBook, record_keep_stats
from fedmount.blocks.transport import Timeouts, Urllib3Transport
from fedmount.blocks.upload import Urllib3Put
from fedmount.daemon_log import detached_log_path
from fedmount.fs import fuse
from fedmount.fs.calls import DEFAULT_API_WAIT
from fedmount.fs.errors import FsError
from fedmount.fs.scratch_root import ScratchOptions, attach_scratch
from fedmount.fs.stats_export import CrunchStat, crunchstat_groups, serve_prometheus
from fedmount.fs.tree import Layout, Tree
from fedmount.stats import Stats

log = logging.getLogger("fedmount")

MiB = 1 << 20
DEFAULT_RAM_CACHE = 256 * MiB
READY_TIMEOUT = 30.0
FUSECTL = "/sys/fs/fuse/connections"
FUSE_REQUESTS = 1024  # read requests the kernel may send at once (its default, 12, starves readers)


class StartupError(Exception):
    """Why the mount could not be made, in one line."""


class UnmountError(Exception):
    pass


@dataclass
class MountOptions:
    mountpoint: str
    layout: Layout = field(default_factory=Layout)
    foreground: bool = False
    exec_args: list[str] | None = None
    replace: bool = False
    nonempty: bool = False
    unmount_timeout: float = 2.0
    allow_other: bool = False
    subtype: str = "fedmount"
    route: str = "home"
    refresh_time: float = 15.0
    api_wait: float = DEFAULT_API_WAIT
    cache_kind: str = "disk"
    disk_cache_dir: str | None = None
    file_cache: int = 0
    disk_cache_size: int = 0
    ram_cache_size: int = 0
    prefetch_blocks: int = DEFAULT_PREFETCH_BLOCKS
    keep_stall_timeout: float = 15.0
    keep_min_rate: float = Timeouts.min_rate
    keep_rate_window: float = Timeouts.rate_window
    max_manifest_size: int = DEFAULT_MAX_ANSWER
    read_ahead_kb: int = 4096
    crunchstat_interval: float = 0.0
    stats_port: int | None = None
    log_path: str | None = None  # the log file, named in the "mounted" line; None: stderr only
    scratch: ScratchOptions = field(default_factory=ScratchOptions)  # --mount-tmp directories

    @property
    def detached(self) -> bool:
        return not (self.foreground or self.exec_args)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MountOptions:
        opts = cls(
            mountpoint=os.path.abspath(args.mountpoint),
            layout=Layout(args.collection, list(args.mount_by_id), list(args.mount_by_pdh)),
            foreground=args.foreground, exec_args=args.exec_args, replace=args.replace,
            nonempty=args.nonempty,
            unmount_timeout=args.unmount_timeout, allow_other=args.allow_other, subtype=args.subtype,
            route=args.route, refresh_time=args.refresh_time, api_wait=args.api_wait,
            cache_kind=args.cache_kind,
            disk_cache_dir=args.disk_cache_dir and os.path.abspath(args.disk_cache_dir),
            file_cache=args.file_cache,
            disk_cache_size=args.disk_cache_size, ram_cache_size=args.ram_cache_size,
            prefetch_blocks=args.prefetch_blocks, keep_stall_timeout=args.keep_stall_timeout,
            keep_min_rate=args.keep_min_rate, keep_rate_window=args.keep_rate_window,
            max_manifest_size=args.max_manifest_size, read_ahead_kb=args.read_ahead_kb,
            crunchstat_interval=args.crunchstat_interval, stats_port=args.stats_port,
            scratch=ScratchOptions(list(args.mount_tmp), args.mount_tmp_dir, args.mount_tmp_size,
                                   [c.strip() for c in (args.storage_classes or "").split(",") if c.strip()]),
        )  # fmt: skip
        if args.logfile:
            opts.log_path = os.path.abspath(args.logfile)
        elif opts.detached:
            opts.log_path = detached_log_path(opts.mountpoint)
        return opts


# -- /proc/self/mountinfo ------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    path: str
    major: int
    minor: int
    fstype: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def _unescape_mountinfo(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit() and len(text[i + 1 : i + 4]) == 3:
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            major, minor = (int(n) for n in fields[2].split(":"))
            entries.append(MountEntry(_unescape_mountinfo(fields[4]), major, minor, fields[sep + 1]))
    return entries


def mounted_at(path: str) -> MountEntry | None:
    """The topmost mount at exactly `path`, or None."""
    found = [m for m in mountinfo() if m.path == path]
    return found[-1] if found else None


# -- unmount -------------------------------------------------------------------------


def _abort_connection(minor: int) -> None:
    abort = f"{FUSECTL}/{minor}/abort"
    if not os.path.exists(abort) and os.geteuid() == 0 and not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        with open(abort, "w") as f:
            f.write("1")
    except OSError as e:
        log.debug("cannot abort FUSE connection %d: %s", minor, e.strerror)


def _detach(path: str) -> str:
    """Lazy unmount; returns what the tools said if they failed."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    said = ""
    if tool:
        done = subprocess.run([tool, "-u", "-z", path], capture_output=True, text=True)
        if done.returncode == 0:
            return ""
        said = done.stderr.strip()
    if os.geteuid() == 0:
        done = subprocess.run(["umount", "-l", path], capture_output=True, text=True)
        if done.returncode == 0:
            return ""
        said = done.stderr.strip() or said
    return said


def unmount(path: str, timeout: float) -> bool:
    """Unmount the FUSE mount at `path` (absolute, not resolved); False if none was there.

    Raises UnmountError (one line) if it is still mounted after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    entry = mounted_at(path)
    if entry is None:
        return False
    if not entry.is_fuse:
        raise UnmountError(f"{path} is a {entry.fstype} mount, not a FUSE mount; not touching it")
    said = ""
    while True:
        _abort_connection(entry.minor)
        said = _detach(path)
        retry_at = min(time.monotonic() + 1.0, deadline)
        while time.monotonic() < retry_at:
            if mounted_at(path) != entry:
                # arv-mount waits a moment here: a lazy unmount still in progress could
                # otherwise detach a new mount made at once on the same path (--replace).
                time.sleep(0.2)
                return True
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            detail = f" ({said})" if said else ""
            raise UnmountError(f"{path} is still mounted after {timeout:g}s{detail}; is a process using it?")


def unmount_command(path: str, timeout: float) -> int:
    try:
        if not unmount(path, timeout):
            print(f"fedmount: {path} is not mounted", file=sys.stderr)
            return 1
    except UnmountError as e:
        print(f"fedmount: {e}", file=sys.stderr)
        return 1
    return 0


# -- start-up --------------------------------------------------------------------------


def _prepare_mountpoint(opts: MountOptions) -> None:
    path = opts.mountpoint
    entry = mounted_at(path)
    if entry is not None and entry.is_fuse:
        if not opts.replace:
            raise StartupError(f"{path} is already a FUSE mount ({entry.fstype}); use --replace, "
                               f"or fedmount --unmount {path}")
        try:
            unmount(path, opts.unmount_timeout)
        except UnmountError as e:
            raise StartupError(f"--replace: {e}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise StartupError(f"cannot mount on {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"cannot mount on {path}: not a directory")
    if not opts.nonempty:
        try:
            hidden = os.listdir(path)
        except OSError as e:
            raise StartupError(f"cannot mount on {path}: {e.strerror}") from None
        if hidden:
            entries = f"{len(hidden)} entr{'y' if len(hidden) == 1 else 'ies'}"
            raise StartupError(f"{path} is not empty ({entries}, which the mount would hide); "
                               "use an empty directory, or --nonempty to mount over it")


def _cache_config(opts: MountOptions) -> tuple[str | None, int, int]:
    """(directory, disk limit, RAM limit) from the cache flags."""
    if opts.cache_kind == "ram":
        return None, 0, opts.ram_cache_size or opts.file_cache or DEFAULT_RAM_CACHE
    directory = opts.disk_cache_dir or default_cache_dir()
    disk = opts.disk_cache_size or opts.file_cache or default_disk_cache_size(directory)
    return directory, disk, opts.ram_cache_size or DEFAULT_RAM_CACHE


def _set_read_ahead(path: str, kb: int) -> None:
    entry = mounted_at(path)
    if kb <= 0 or entry is None or os.geteuid() != 0:
        return
    knob = f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.warning("cannot set %s to %d: %s", knob, kb, e.strerror)


def _raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (to fs.nr_open if the hard one is unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            wanted = int(f.read())
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, e)
        return
    log.debug("open-file limit raised from %d to %d", soft, wanted)


def _raise_fuse_requests(path: str) -> int:
    """Let the kernel send the mount up to FUSE_REQUESTS read requests at once (needs root: a reader
    waiting for room in the block cache holds one, admission.py); the limit in effect."""
    entry = mounted_at(path)
    knob = f"{FUSECTL}/{entry.minor}" if entry is not None else None
    if knob is None or os.geteuid() != 0:
        return 12
    try:
        limits = {"max_background": FUSE_REQUESTS, "congestion_threshold": FUSE_REQUESTS * 3 // 4}
        for name, value in limits.items():
            with open(f"{knob}/{name}", "w") as f:
                f.write(str(value))
        with open(f"{knob}/max_background") as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        log.warning("cannot raise %s/max_background: %s", knob, e)
        return 12


def _daemonize() -> Callable[[str | None], None] | int:
    """Fork. In the parent: wait for the child's word and return the exit status.
    In the child: return the function that reports readiness (None) or a failure line."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        word = b"".join(chunks).decode(errors="replace").strip()
        if word == "ready":
            return 0
        print(word or f"fedmount: the daemon (pid {pid}) exited before the mount was ready; "
                      "run with --foreground to see why", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory (perhaps on another mount) busy
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)

    def report(failure: str | None) -> None:
        os.write(write_end, b"ready\n" if failure is None else f"fedmount: {failure}\n".encode())
        os.close(write_end)
        if failure is None:  # detach from the terminal's output from now on: log to the file only
            root = logging.getLogger()
            root.handlers[:] = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)

    return report


def run(opts: MountOptions) -> int:
    """Mount and serve until unmounted; the process exit status."""
    try:
        settings = Settings.from_environment()
        _prepare_mountpoint(opts)
    except (SettingsError, StartupError) as e:
        print(f"fedmount: {e}", file=sys.stderr)
        return 1
    report: Callable[[str | None], None]
    if opts.foreground or opts.exec_args:
        def report(failure: str | None) -> None:
            if failure is not None:
                print(f"fedmount: {failure}", file=sys.stderr)
    else:
        forked = _daemonize()
        if isinstance(forked, int):
            return forked
        report = forked
    daemon = Daemon(opts, settings, report)
    try:
        return trio.run(daemon.main)
    except StartupError as e:
        report(str(e))
        return 1
    except KeyboardInterrupt:  # before the mount was made: nothing to clean up
        return 130


class Daemon:
    def __init__(self, opts: MountOptions, settings: Settings, report: Callable[[str | None], None]):
        self.opts = opts
        self.settings = settings
        self.report = report
        self.stats = Stats()
        self._command: trio.Process | None = None
        self._reader: BlockReader | None = None

    async def main(self) -> int:
        opts, stats = self.opts, self.stats
        _raise_open_file_limit()
        try:
            federation = await Federation.connect(
                self.settings, mode=opts.route, stats=stats, max_answer=opts.max_manifest_size  # type: ignore[arg-type]
            )
        except ApiError as e:
            raise StartupError(f"cannot use the home cluster {self.settings.api_host}: {e.message}") from None
        try:
            if opts.route == "direct" and federation.settings.token.is_v1:
                raise StartupError(f"--route direct {V2_NEEDED}")
            directory, disk_limit, ram_limit = _cache_config(opts)
            cache = BlockCache(directory, disk_limit, ram_limit, stats)
            transport = Urllib3Transport(ca_file=self.settings.ca_file, insecure=self.settings.insecure)
            timeouts = Timeouts(stall=opts.keep_stall_timeout, min_rate=opts.keep_min_rate,
                                rate_window=opts.keep_rate_window)
            keep = KeepClient(transport, stats=stats, timeouts=timeouts)
            reader = BlockReader(keep, cache, stats=stats, prefetch_blocks=opts.prefetch_blocks)
            self._reader = reader
            capacity = disk_limit or ram_limit
            gauge = "cache_disk_bytes" if disk_limit else "cache_ram_bytes"
            tree = Tree(
                federation, reader, stats=stats, layout=opts.layout, refresh_time=opts.refresh_time,
                api_wait=opts.api_wait,
                cached_bytes=cache.cached_bytes, cache_usage=lambda: (capacity, int(stats.get(gauge))),
            )
            try:
                await tree.start()
            except FsError as e:
                raise StartupError(f"cannot mount --collection {opts.layout.collection}: {e}") from None
            try:
                put = Urllib3Put(ca_file=self.settings.ca_file, insecure=self.settings.insecure)
                attach_scratch(tree, federation, opts.scratch, transport=put, stats=stats)
            except FsError as e:
                raise StartupError(str(e)) from None
            try:
                return await self._serve(tree)
            finally:
                book = ThroughputBook.in_cache_dir(cache.directory)  # no file for a RAM-only cache
                record_keep_stats(book, stats)
                book.save()
        finally:
            await federation.aclose()

    async def _serve(self, tree: Tree) -> int:
        opts = self.opts
        ops = fuse.FuseOperations(tree, self.stats)
        try:
            fuse.mount(ops, opts.mountpoint, subtype=opts.subtype, allow_other=opts.allow_other,
                       writable=bool(opts.scratch.names))
        except OSError as e:
            raise StartupError(e.strerror or str(e)) from None
        status = 0
        try:
            async with trio.open_nursery() as nursery:
                tree.calls.nursery = nursery  # API calls that outlive their FUSE request run here
                nursery.start_soon(self._fuse_loop, nursery.cancel_scope)
                nursery.start_soon(ops.invalidations)
                await nursery.start(self._signals)
                try:
                    with trio.fail_after(READY_TIMEOUT):
                        await trio.to_thread.run_sync(os.stat, opts.mountpoint)
                except trio.TooSlowError:
                    raise StartupError(f"the mount at {opts.mountpoint} did not answer within "
                                       f"{READY_TIMEOUT:g}s") from None
                _set_read_ahead(opts.mountpoint, opts.read_ahead_kb)
                if self._reader is not None:
                    self._reader.allow_requests(_raise_fuse_requests(opts.mountpoint))
                if opts.stats_port is not None:
                    try:
                        await nursery.start(serve_prometheus, self.stats, opts.stats_port)
                    except OSError as e:
                        raise StartupError(f"--stats-port {opts.stats_port}: {e.strerror}") from None
                if opts.crunchstat_interval:
                    process = psutil.Process()
                    crunchstat = CrunchStat(opts.crunchstat_interval,
                                            lambda: crunchstat_groups(self.stats, process))
                    nursery.start_soon(crunchstat.run)
                tree.ready = True
                log.info("mounted at %s (home cluster %s, route %s)%s", opts.mountpoint,
                         tree.federation.home_cluster, opts.route,  # type: ignore[attr-defined]
                         f"; log in {opts.log_path}" if opts.log_path else "")
                self.report(None)
                if opts.exec_args:
                    status = await self._run_command(opts.exec_args)
                    fuse.terminate()
        finally:
            still_mounted = mounted_at(opts.mountpoint) is not None
            fuse.close(unmount=still_mounted)
            log.info("unmounted %s", opts.mountpoint)
        return status

    async def _fuse_loop(self, scope: trio.CancelScope) -> None:
        await fuse.serve()
        scope.cancel()

    async def _signals(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if self._command is not None and self._command.returncode is None:
                    self._command.send_signal(signum)
                else:
                    log.info("%s: unmounting", signal.Signals(signum).name)
                    fuse.terminate()

    async def _run_command(self, argv: list[str]) -> int:
        try:
            self._command = await trio.lowlevel.open_process(argv)
        except OSError as e:
            log.error("cannot run %s: %s", argv[0], e.strerror)
            return 127 if e.errno == errno.ENOENT else 126
        code = await self._command.wait()
        return 128 - code if code < 0 else code
