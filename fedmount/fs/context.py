"""What the nodes of a mount share: the `MountContext`, and what the fs needs of the rest.

Nodes do not reach back into the `Tree`: a directory or a collection is given the mount's
context when it is made and finds there everything that is the mount's rather than its
own: the clocks (monotonic for refresh intervals, wall for signature expiries and times
shown), the stats, the inode table, the background API calls (`Calls`), the refresh
policy, the block reader and cache, the sink that passes an `Invalidation` to the kernel,
and whether the mount is ready. The collection loader (`fs/loader.py`) is not part of it:
the directories that load collections hold it.

The Protocols below are all the fs asks of the layers under it: the federation's
collection records and summaries (`fedmount.api.federation`), and the block reader's
open files (`fedmount.blocks`). Tests drive the fs with small fakes of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedmount.arvados.ids import CollectionId
from fedmount.arvados.manifest import File
from fedmount.arvados.routes import KeepRoute
from fedmount.stats import Stats

from .calls import Calls
from .inodes import InodeTable
from .nodes import FOREVER, Node

MIN_SIGNATURE_REFRESH = 2.0  # seconds: the shortest wait before fetching fresh signatures
RETRY_AFTER_ERROR = 30.0  # seconds before a failed refresh is tried again


class CollectionSummaryLike(Protocol):
    uuid: str
    portable_data_hash: str
    modified_at: float | None
    cluster: str
    answer: dict[str, Any]  # the API's answer as it came
    route: KeepRoute


class CollectionRecordLike(CollectionSummaryLike, Protocol):
    manifest_text: str


class FederationLike(Protocol):
    async def get_collection(self, cid: CollectionId) -> CollectionRecordLike: ...
    async def get_summary(self, cid: CollectionId, fields: Sequence[str]) -> CollectionSummaryLike: ...


class FileReaderLike(Protocol):
    async def read(self, offset: int, size: int) -> bytes: ...
    def close(self) -> None: ...


class BlockReaderLike(Protocol):
    def open(self, file: File, route: KeepRoute) -> FileReaderLike: ...


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What the kernel must forget after a UUID collection changed its content."""

    attrs: list[int]  # directories whose attributes (and entries) are stale
    entries: list[tuple[int, str]]  # (parent inode, name) of paths now of another inode, or none


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """How long what the mount shows may be served without asking the API again."""

    refresh_time: float = 15.0  # a UUID collection is re-checked when touched after this
    negative_ttl: float = 15.0  # a name found absent is not asked about again for this long

    def timeout(self, immutable: bool) -> float:
        """How long the kernel may cache entries and attributes (PDH content: forever)."""
        return FOREVER if immutable else self.refresh_time

    def signatures_refresh_at(self, expiry: int | None, now: float) -> float:
        """When to fetch fresh signatures for ones that expire at `expiry`: at half the time
        left, and never sooner than `MIN_SIGNATURE_REFRESH` (never if none is signed)."""
        if expiry is None:
            return math.inf
        return now + max((expiry - now) / 2, MIN_SIGNATURE_REFRESH)


def _ignore_change(change: Invalidation) -> None:
    """The change sink until the adapter sets its own (a tree served by no kernel)."""


@dataclass(eq=False)
class MountContext:
    """The mount's shared state and services (see the module docstring)."""

    stats: Stats
    reader: BlockReaderLike
    calls: Calls
    policy: RefreshPolicy
    cached_bytes: Callable[[str], int]  # bytes of a block (by ``hash+size``) in the cache
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    table: InodeTable[Node] = field(default_factory=InodeTable)
    on_change: Callable[[Invalidation], None] = _ignore_change  # set by the adapter
    ready: bool = False  # the mount answers (by_id/README exists from then on)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.wall()
