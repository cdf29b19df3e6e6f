"""Blocks and caches for the block cache tests: made-up blocks with their keys, fresh caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedmount.blocks.cache import TieredCache
from fedmount.stats import Stats

MiB = 1 << 20


def make_block(size: int, seed: int = 0) -> tuple[str, bytes]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    data = bytes((b + i) & 0xFF for i, b in enumerate(data[:4096])) + data[4096:]
    return f"{hashlib.md5(data).hexdigest()}+{size}", data


def fresh(cache_dir: Path, **kw: int) -> tuple[TieredCache, Stats]:
    stats = Stats()
    args = {"disk_limit": 64 * MiB, "ram_limit": 8 * MiB} | kw
    return TieredCache(str(cache_dir), stats=stats, **args), stats


def block_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / "blocks" / key[:2] / key


async def on_disk(cache_dir: Path, size: int, seed: int = 0) -> tuple[str, bytes]:
    """A block put into the disk cache by another cache instance (a mount before this one)."""
    writer, _ = fresh(cache_dir)
    key, data = make_block(size, seed)
    await writer.put(key, data)
    return key, data
