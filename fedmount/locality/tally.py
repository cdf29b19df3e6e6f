"""`Tally`: a number of blocks and their bytes, the unit every locality report counts in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Tally:
    blocks: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, sizes: Iterable[int]) -> Tally:
        """The tally of blocks of these sizes."""
        blocks = total = 0
        for size in sizes:
            blocks += 1
            total += size
        return cls(blocks, total)

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.blocks + other.blocks, self.bytes + other.bytes)

    def to_json(self) -> dict[str, int]:
        return {"blocks": self.blocks, "bytes": self.bytes}
