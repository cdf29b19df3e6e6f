"""Deterministic file content that is cheap to generate and does not repeat within a file.

Large seeded files (hundreds of MiB) must be produced in well under a second per hundred
MiB, the same on every run, and must not be made of identical blocks (Keep would store
one block and a reader would never fetch a second). A 1 MiB base pattern is the md5 chain
``d0 = md5(seed), d(k+1) = md5(d(k))`` (65,536 digests); MiB number j of a file is that
pattern rotated by ``j * 40503 mod 1 MiB`` bytes, so every MiB differs from its neighbours
while generation costs one slice per MiB.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 1 << 20


@dataclass(frozen=True)
class Generated:
    """Stand-in for `size` bytes of generated content named by `seed`."""

    size: int
    seed: str = "fedmount"

    def chunks(self) -> Iterator[bytes]:
        base = _base(self.seed)
        remaining, j = self.size, 0
        while remaining > 0:
            r = (j * 40503) % CHUNK
            piece = base[r:] + base[:r]
            yield piece[:remaining]
            remaining -= min(remaining, CHUNK)
            j += 1

    def read(self) -> bytes:
        return b"".join(self.chunks())


@functools.lru_cache(maxsize=16)
def _base(seed: str) -> bytes:
    digest = hashlib.md5(seed.encode()).digest()
    out = bytearray()
    for _ in range(CHUNK // 16):
        out += digest
        digest = hashlib.md5(digest).digest()
    return bytes(out)
