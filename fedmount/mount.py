"""The daemon's life: check, (fork,) connect, mount, serve, unmount.

Start-up, in order, so that every failure is one line *before* anything is mounted:

1. client settings (`Settings.from_environment`);
2. the mount point (`startup.prepare_mountpoint`: an existing FUSE mount is refused or,
   with ``--replace``, unmounted; a non-empty directory is refused unless ``--nonempty``);
3. without ``--foreground``/``--exec``, fork (`startup.daemonize`): the parent exits once
   the child is ready, or prints its one-line reason. The child logs to stderr and to its
   log file (``--logfile``, else `logs`' file named after the mount point) until it is
   ready, then to the file only;
4. the open-file limit raised (`startup.raise_open_file_limit`); `Federation.connect` (a
   wrong token or an unreachable home cluster stops here; so does ``--route direct`` with
   a v1 token that could not be made v2), the block layers, `Tree.start` (``--collection``
   must exist);
5. `fuse.mount`, then the FUSE loop; the mount is "ready" once a ``stat`` of the mount
   point made from a worker thread has been answered by that loop: only then does
   ``by_id/README`` appear, is the "mounted" line (naming the log file) logged, and does
   the parent get "ready";
6. SIGINT/SIGTERM end the loop (with ``--exec`` they are forwarded to the command, whose
   exit ends it); the mount is then unmounted (lazily: a busy mount point detaches);
7. the Keep throughput this daemon observed per cluster is folded into the cache
   directory's `ThroughputBook`, which ``fedmount locate`` estimates from.

``fedmount --unmount`` is `unmount.unmount_command`; `MountOptions` is what was asked.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable

import psutil
import trio

from fedmount import mountinfo
from fedmount.api.federation import Federation
from fedmount.api.listing import ProjectSource
from fedmount.arvados.errors import ApiError
from fedmount.arvados.settings import Settings, SettingsError
from fedmount.arvados.tokens import V2_NEEDED
from fedmount.blocks.cache import CacheConfig, TieredCache
from fedmount.blocks.fetcher import BlockReader
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.throughput import ThroughputBook
from fedmount.blocks.transport import Timeouts, Urllib3Transport
from fedmount.blocks.upload import Urllib3Put
from fedmount.fs import fuse
from fedmount.fs.errors import FsError
from fedmount.fs.scratch_root import attach_scratch
from fedmount.fs.tree import Tree
from fedmount.mount_options import MountOptions
from fedmount.startup import (
    StartupError,
    daemonize,
    prepare_mountpoint,
    raise_fuse_requests,
    raise_open_file_limit,
    set_read_ahead,
)
from fedmount.stats import Stats
from fedmount.stats_export import CrunchStat, crunchstat_groups, serve_prometheus

log = logging.getLogger("fedmount")

READY_TIMEOUT = 30.0


def _cache_config(opts: MountOptions) -> CacheConfig:
    """The cache's directory and bounds from the cache flags."""
    if opts.cache_kind == "ram":
        return CacheConfig.memory_only(opts.ram_cache_size or opts.file_cache)
    disk = opts.disk_cache_size or opts.file_cache
    return CacheConfig.for_directory(opts.disk_cache_dir, disk, opts.ram_cache_size)


def run(opts: MountOptions) -> int:
    """Mount and serve until unmounted; the process exit status."""
    try:
        settings = Settings.from_environment()
        prepare_mountpoint(opts)
    except (SettingsError, StartupError) as e:
        print(f"fedmount: {e}", file=sys.stderr)
        return 1
    report: Callable[[str | None], None]
    if opts.foreground or opts.exec_args:
        def report(failure: str | None) -> None:
            if failure is not None:
                print(f"fedmount: {failure}", file=sys.stderr)
    else:
        forked = daemonize()
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
        raise_open_file_limit()
        try:
            federation = await Federation.connect(
                self.settings, mode=opts.route, stats=stats, max_answer=opts.max_manifest_size  # type: ignore[arg-type]
            )
        except ApiError as e:
            raise StartupError(f"cannot use the home cluster {self.settings.api_host}: {e.message}") from None
        try:
            if opts.route == "direct" and federation.settings.token.is_v1:
                raise StartupError(f"--route direct {V2_NEEDED}")
            cache = TieredCache.configured(_cache_config(opts), stats)
            transport = Urllib3Transport(ca_file=self.settings.ca_file, insecure=self.settings.insecure)
            timeouts = Timeouts(stall=opts.keep_stall_timeout, min_rate=opts.keep_min_rate,
                                rate_window=opts.keep_rate_window)
            keep = KeepClient(transport, stats=stats, timeouts=timeouts, hedge_after=opts.keep_hedge_after)
            reader = BlockReader(keep, cache, stats=stats, read_ahead_blocks=opts.read_ahead_blocks)
            self._reader = reader
            projects = ProjectSource(federation, opts.layout.filters)  # and the batched re-checks
            tree = Tree(
                federation, reader, stats=stats, layout=opts.layout, refresh_time=opts.refresh_time,
                api_wait=opts.api_wait, projects=projects if opts.layout.lists_projects else None,
                summaries=projects,
                cached_bytes=cache.cached_bytes, cache_usage=cache.usage,
            )
            try:
                await tree.start()
            except FsError as e:
                raise StartupError(f"cannot mount {opts.layout.root_option()}: {e}") from None
            try:
                put = Urllib3Put(ca_file=self.settings.ca_file, insecure=self.settings.insecure)
                attach_scratch(tree, federation, opts.scratch, transport=put, stats=stats)
            except FsError as e:
                raise StartupError(str(e)) from None
            try:
                return await self._serve(tree)
            finally:
                book = ThroughputBook.in_cache_dir(cache.directory)  # no file for a RAM-only cache
                keep.meter.record_into(book)
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
                set_read_ahead(opts.mountpoint, opts.read_ahead_kb)
                if self._reader is not None:
                    self._reader.allow_requests(raise_fuse_requests(opts.mountpoint))
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
            still_mounted = mountinfo.mounted_at(opts.mountpoint) is not None
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
