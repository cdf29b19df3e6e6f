"""`MountOptions`: what ``fedmount MOUNTPOINT`` was asked to do, from its parsed command line.

The defaults are the command line's (`fedmount.defaults`); `from_args` also decides where
the log goes: ``--logfile``, else, for a detached daemon, its file named after the mount
point (`logs.detached_log_path`), else stderr only.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from fedmount import defaults
from fedmount.fs.scratch_root import ScratchOptions
from fedmount.fs.tree import Layout
from fedmount.logs import detached_log_path


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
    route: str = "auto"
    refresh_time: float = 15.0
    api_wait: float = defaults.API_WAIT
    cache_kind: str = "disk"
    disk_cache_dir: str | None = None
    file_cache: int = 0
    disk_cache_size: int = 0
    ram_cache_size: int = 0
    read_ahead_blocks: int = defaults.READ_AHEAD_BLOCKS
    keep_stall_timeout: float = 15.0
    keep_hedge_after: float | None = None  # None: auto; 0: never
    keep_min_rate: float = defaults.KEEP_MIN_RATE
    keep_rate_window: float = defaults.KEEP_RATE_WINDOW
    max_manifest_size: int = defaults.MAX_MANIFEST_SIZE
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
            layout=_layout(args),
            foreground=args.foreground, exec_args=args.exec_args, replace=args.replace,
            nonempty=args.nonempty,
            unmount_timeout=args.unmount_timeout, allow_other=args.allow_other, subtype=args.subtype,
            route=args.route, refresh_time=args.refresh_time, api_wait=args.api_wait,
            cache_kind=args.cache_kind,
            disk_cache_dir=args.disk_cache_dir and os.path.abspath(args.disk_cache_dir),
            file_cache=args.file_cache,
            disk_cache_size=args.disk_cache_size, ram_cache_size=args.ram_cache_size,
            read_ahead_blocks=args.read_ahead_blocks, keep_stall_timeout=args.keep_stall_timeout,
            keep_hedge_after=args.keep_hedge_after,
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


def _layout(args: argparse.Namespace) -> Layout:
    """The root the layout options ask for; with none of them, everything (--all)."""
    custom = args.mount_by_id + args.mount_by_pdh + args.mount_home + args.mount_shared + args.mount_by_tag
    mode = None if args.mode == "all" else args.mode
    return Layout(args.collection, list(args.mount_by_id), list(args.mount_by_pdh), list(args.mount_home),
                  list(args.mount_shared), list(args.mount_by_tag), mode=mode, project=args.project,
                  everything=not (args.collection or custom or mode), filters=list(args.filters))
