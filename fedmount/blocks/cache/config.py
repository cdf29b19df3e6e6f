"""Where a block cache lives and how big it may grow: one rule for every process sharing it.

Every process that writes to a cache directory (a mount, `fedmount stage`, `fedmount-run
--stage`) evicts down to its own disk bound, so they must use the same bound for the same
directory, or one would evict what another just staged. `CacheConfig.for_directory` is that
rule: an explicit size wins; otherwise `default_disk_cache_size`, arv-mount's rule
(sdk/python/arvados/keep.py): the smaller of 10% of the filesystem's size and 25% of its
available space, where "available" counts the bytes this cache already holds (from the
index) as available, so the bound does not shrink as the cache fills; at least
`MIN_DISK_CACHE`. The memory tier's bound is the caller's (a mount serves readers from it;
a stage only passes blocks through it).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from .index import held_bytes

MiB = 1 << 20
MIN_DISK_CACHE = 64 * MiB  # the smallest default disk bound: one full-size Keep block
DEFAULT_RAM_CACHE = 256 * MiB  # the memory tier of a mount


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedmount")


def default_disk_cache_size(directory: str | None = None) -> int:
    """The disk tier's bound when none is given (see the module docstring).

    Creates `directory` (default `default_cache_dir()`) so that the filesystem it will live
    on is the one measured; `MIN_DISK_CACHE` if it cannot be created or measured."""
    directory = directory if directory is not None else default_cache_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        vfs = os.statvfs(directory)
    except OSError:
        return MIN_DISK_CACHE
    size = min(vfs.f_blocks * vfs.f_frsize // 10, (vfs.f_bavail * vfs.f_frsize + held_bytes(directory)) // 4)
    return max(size, MIN_DISK_CACHE)


class CacheConfig(NamedTuple):
    """A cache's directory (None: memory only) and its disk and memory bounds in bytes."""

    directory: str | None
    disk_limit: int
    ram_limit: int

    @classmethod
    def for_directory(
        cls, directory: str | None, disk: int | None = None, ram: int | None = None
    ) -> CacheConfig:
        """A disk cache in `directory` (default `default_cache_dir()`), bounded to `disk` bytes (default
        and 0: `default_disk_cache_size` of the directory) with a memory tier of `ram` bytes."""
        directory = directory or default_cache_dir()
        return cls(directory, disk or default_disk_cache_size(directory), ram or DEFAULT_RAM_CACHE)

    @classmethod
    def memory_only(cls, ram: int | None = None) -> CacheConfig:
        return cls(None, 0, ram or DEFAULT_RAM_CACHE)
