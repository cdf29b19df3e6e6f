"""The block-file format: a block's bytes, then a trailer of per-chunk checksums.

A block file (``<dir>/blocks/<hash[:2]>/<hash>+<size>``) holds the block's bytes at offset
0, then the trailer: one xxh3-64 per 1 MiB chunk (little-endian u64), the block size (u64)
and an 8-byte magic. The md5 in the locator covers the whole block and is checked once,
when the block arrives from Keep; the per-chunk xxh3 lets a later reader check only the
chunks it reads, at memory speed, before it serves them. The checksum detects damage (a
truncated or foreign file, a flipped bit), not malice: it is not keyed, which is why the
directory must be one only its user can write (ownership.py).
"""

from __future__ import annotations

import re
import struct

import xxhash

CHUNK = 1 << 20  # the unit of verification on disk and of the memory tier
DIGEST = xxhash.xxh3_64_intdigest
MAGIC = b"FMBLK\x01\x00\x00"
KEY_NAME = re.compile(r"[0-9a-f]{32}\+[0-9]+")  # a block file's name: its key
TEMPORARY_NAME = re.compile(r"[0-9a-f]{32}\+[0-9]+\.tmp\..+")  # a named block file not yet whole


def key_size(key: str) -> int:
    """The block size from a ``hash+size`` key."""
    return int(key.partition("+")[2])


def chunk_count(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


def trailer(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3 of every 1 MiB chunk, the size and the magic: what follows the bytes in a block file."""
    view = memoryview(data)
    sums = [DIGEST(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK)]
    return struct.pack(f"<{len(sums)}Q", *sums) + struct.pack("<Q", len(view)) + MAGIC


def trailer_length(size: int) -> int:
    return 8 * chunk_count(size) + 8 + len(MAGIC)


def parse_trailer(tail: bytes, size: int) -> tuple[int, ...] | None:
    """The chunk checksums of a block of `size` bytes from its file's trailer, or None if the
    trailer is not one (wrong length, magic or size)."""
    n = chunk_count(size)
    if len(tail) != trailer_length(size) or tail[-len(MAGIC) :] != MAGIC:
        return None
    if struct.unpack_from("<Q", tail, 8 * n)[0] != size:
        return None
    return struct.unpack_from(f"<{n}Q", tail)
