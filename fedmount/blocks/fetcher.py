"""Block reads: every block read of the daemon, from the cache or fetched once from Keep.

`BlockReader.read` asks the cache (cache/) for a block's range; on a miss it starts a
fetch, or joins the one in flight. A fetch opens a cache transaction
(``txn = await cache.begin(key, size)``), has Keep receive the block into ``txn.buffer``
(keep.py verifies its md5 before returning), hands the bytes to every reader waiting on
it, then commits the transaction; a failed fetch aborts it. `read_ahead` starts the same
fetch for a block nobody waits for yet: the read-ahead window's (readahead.py).

## Limits

- One fetch per block on the whole host process: an in-flight table keyed by
  ``hash+size`` makes every concurrent reader of a block (demand or read-ahead, any file,
  any collection) wait for the same GET; the block is cached once and handed to all.
- Read-ahead fetches are bounded by ``per_service`` concurrent GETs (default 4) to the block's
  first-choice keep service (rendezvous order) and ``per_cluster`` (default 8) per
  cluster, so read-ahead cannot monopolise a keepstore, and by a memory budget
  ``read_ahead_memory`` (default 512 MiB, eight 64 MiB blocks): a read-ahead fetch starts only if
  the bytes of all in-flight fetches stay below it (a block is then owned by the
  cache's bounded memory tier). Over the budget, or when the cache has no room for the
  block (admission.py), the read-ahead fetch is skipped, not queued; the next block change asks
  again. A demand fetch is never limited by these, but waits its turn for room in the
  cache when readers outnumber it (admission.py), and the block it fetched for a
  sequential reader stays in the cache until that reader is past it. The limits are sized
  so that one sequential reader's full window fits: its GETs spread over a cluster's
  keepstores by rendezvous order, and with two keepstores a window of 4 puts 2-4 on one.
- A read-ahead fetch first checks whether the block is already cached and then costs nothing.
- Read-ahead failures are counted and dropped; a demand read that was waiting on a failed
  read-ahead fetch starts its own fetch, so its error (or its bytes) are its own.

## Stats

``read_ahead_inflight_bytes`` (gauge), ``read_ahead_started``, ``read_ahead_used`` and
``read_ahead_wasted`` (blocks fetched ahead that a reader later touched, or that aged out
of the tracking table of ``TRACKED`` entries untouched), ``read_ahead_errors``,
``read_ahead_over_budget``; the cache counts hits and misses (count and bytes).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING

import trio

from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import Locator
from fedmount.arvados.routes import KeepRoute
from fedmount.stats import Stats

from .admission import Admission
from .cache import BlockCache, Transaction
from .keep import KeepClient, probe_order
from .readahead import DEFAULT_READ_AHEAD_BLOCKS, INITIAL_WINDOW, VERIFY_AHEAD_CHUNKS, FileReader

if TYPE_CHECKING:
    from fedmount.arvados.manifest import File

log = logging.getLogger("fedmount.readahead")

MiB = 1 << 20
TRACKED = 256  # blocks fetched ahead, remembered for the used/wasted accounting


class _Fetch:
    """One in-flight block fetch; any number of readers wait on it."""

    def __init__(self, locator: Locator, *, ahead: bool, reader_at: int | None = None):
        self.locator = locator
        self.ahead = ahead  # a read-ahead: its failure is not a reader's answer
        self.reader_at = reader_at  # where the sequential reader it is for reads first (admission.py)
        self.done = trio.Event()
        self.data: bytes | bytearray | memoryview | None = None  # None after success: in the cache
        self.error: BlockError | None = None

    async def wait(self) -> bytes | bytearray | memoryview | None:
        await self.done.wait()
        if self.error is not None:
            raise type(self.error)(self.error.locator, str(self.error)) from self.error
        return self.data


class BlockReader:
    """Cache + Keep + in-flight dedupe + bounded read-ahead; one per daemon, shared by all files."""

    def __init__(
        self,
        keep: KeepClient,
        cache: BlockCache,
        *,
        stats: Stats | None = None,
        read_ahead_blocks: int = DEFAULT_READ_AHEAD_BLOCKS,
        initial_window: int = INITIAL_WINDOW,
        read_ahead_memory: int = 512 * MiB,
        per_service: int = 4,
        per_cluster: int = 8,
    ):
        self._keep = keep
        self._cache = cache
        self.stats = stats if stats is not None else Stats()
        self.read_ahead_blocks = read_ahead_blocks
        self.initial_window = initial_window
        self._read_ahead_memory = read_ahead_memory
        self._inflight: dict[str, _Fetch] = {}
        self._inflight_bytes = 0
        self._service_limits: defaultdict[str, trio.CapacityLimiter] = defaultdict(
            lambda: trio.CapacityLimiter(per_service)
        )
        self._cluster_limits: defaultdict[str, trio.CapacityLimiter] = defaultdict(
            lambda: trio.CapacityLimiter(per_cluster)
        )
        self._fetched_ahead: OrderedDict[str, int] = OrderedDict()  # fetched ahead, not yet used
        self._admission = Admission(cache, self.stats)

    def allow_requests(self, count: int) -> None:
        """The kernel sends up to `count` read requests at once: how many may wait for room in the
        cache (admission.py, "The kernel's queue")."""
        self._admission.max_waiting = max(1, count * 3 // 4)

    def open(self, file: File, route: KeepRoute) -> FileReader:
        return FileReader(self, file, route)

    async def read(
        self, locator: Locator, route: KeepRoute, offset: int, length: int, *, sequential: bool = False
    ) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset+length) of one block, from the cache or fetched (once) from Keep.

        Possibly a read-only view (readahead.py, "Reads"). A `sequential` reader also gets
        the next cached chunks verified ahead of it, and holds the block while it reads it; a
        fetch waits its turn for room in the cache (admission.py)."""
        key = locator.key
        self._mark_used(key)
        ahead = VERIFY_AHEAD_CHUNKS if sequential else 0
        while True:
            fetch = self._inflight.get(key)
            if fetch is None:
                data = await self._cache.read(key, offset, length, verify_ahead=ahead)
                if data is not None:
                    break
                fetch = self._inflight.get(key)
            if fetch is None:
                if await self._admission.fetch(key, locator.size) and key not in self._inflight:
                    data = await self._cache.read(key, offset, length, verify_ahead=ahead)
                    if data is not None:  # it arrived while this reader waited its turn
                        self._admission.fetched(key, None)
                        break
                fetch = self._inflight.get(key) or self._start(
                    locator, route, ahead=False, reader_at=offset if sequential else None
                )
            try:
                block = await fetch.wait()
            except BlockError:
                if not fetch.ahead:
                    raise
                # The read joined a read-ahead that failed: that answer was the read-ahead's,
                # so the reader makes its own attempt (and gets its own error).
                continue
            if block is not None:
                data = memoryview(block)[offset : offset + length].toreadonly()
                break
            # else a read-ahead fetch found it cached (or a fetch ended before this reader woke):
            # read it from there
        if sequential:
            self._admission.read(key, locator.size, offset, offset + len(data))
        return data

    def verify_ahead(self, locator: Locator, offset: int, length: int) -> None:
        """Have the cache verify [offset, offset+length) of a block on disk ahead of a reader."""
        if locator.key not in self._inflight:  # a block being fetched is verified by its md5
            self._cache.verify_ahead(locator.key, offset, length)

    def read_ahead(self, locator: Locator, route: KeepRoute) -> None:
        """Fetch a block in the background if it is not in flight and the budget allows."""
        if locator.key in self._inflight or locator.size == 0:
            return
        if self._inflight_bytes + locator.size > self._read_ahead_memory or not self._admission.try_fetch(
            locator.key, locator.size
        ):
            self.stats.add("read_ahead_over_budget")
            return
        self._start(locator, route, ahead=True)

    def _start(
        self, locator: Locator, route: KeepRoute, *, ahead: bool, reader_at: int | None = None
    ) -> _Fetch:
        """Fetch a block in the background; its room in the cache is admitted already."""
        fetch = _Fetch(locator, ahead=ahead, reader_at=reader_at)
        log.debug("fetching %s (%s)", locator.key, "ahead" if ahead else f"for a reader at {reader_at}")
        self._inflight[locator.key] = fetch
        self._inflight_bytes += locator.size
        self.stats.set("read_ahead_inflight_bytes", self._inflight_bytes)
        trio.lowlevel.spawn_system_task(self._run, fetch, route, ahead, name=f"fetch {locator.key}")
        return fetch

    async def _run(self, fetch: _Fetch, route: KeepRoute, ahead: bool) -> None:
        """Fetch, hand the bytes to the waiters, then commit them to the cache. Never raises."""
        locator = fetch.locator
        key = locator.key
        txn: Transaction | None = None
        try:
            if ahead:
                self.stats.add("read_ahead_started")
                first = probe_order(locator.hash, route.services)[0].uuid if route.services else ""
                async with self._service_limits[first], self._cluster_limits[route.cluster]:
                    cached = await trio.to_thread.run_sync(self._cache.cached_bytes, key)
                    if cached < locator.size:
                        txn = await self._get(locator, route)
            else:
                txn = await self._get(locator, route)
            fetch.data = txn.buffer if txn is not None else None
            fetch.done.set()
            if txn is not None:
                if ahead:
                    self._track(key, locator.size)
                self._admission.fetched(key, fetch.reader_at)  # held before the commit can evict anything
                await txn.commit()
        except BlockError as exc:
            fetch.error = exc
            if ahead:
                self.stats.add("read_ahead_errors")
                log.debug("read-ahead of %s failed: %s", key, exc)
        except Exception as exc:  # a bug must fail the readers, not the daemon
            log.exception("fetching block %s failed unexpectedly", key)
            fetch.error = BlockError(locator, f"block {key}: internal error {type(exc).__name__}: {exc}")
        finally:
            if txn is not None:  # the fetch failed or was cancelled (nothing happens after a commit)
                txn.abort()
            if fetch.error is None and not fetch.done.is_set():  # cancelled at shutdown
                fetch.error = BlockError(locator, f"block {key}: fetch cancelled")
            fetch.done.set()
            fetch.data = None  # the cache holds it now; do not pin it here
            self._admission.fetched(key, None)  # unless it is held already
            if self._inflight.get(key) is fetch:  # a KeyError here would end the daemon (trio system task)
                del self._inflight[key]
            self._inflight_bytes -= locator.size
            self.stats.set("read_ahead_inflight_bytes", self._inflight_bytes)

    async def _get(self, locator: Locator, route: KeepRoute) -> Transaction:
        """The block from Keep, md5-verified, received into a new cache transaction's buffer; the
        transaction is aborted if the fetch fails."""
        txn = await self._cache.begin(locator.key, locator.size)
        try:
            await self._keep.get(locator, route, txn.buffer)
        except BaseException:
            txn.abort()
            raise
        return txn

    def _track(self, key: str, size: int) -> None:
        self._fetched_ahead[key] = size
        while len(self._fetched_ahead) > TRACKED:
            self._fetched_ahead.popitem(last=False)
            self.stats.add("read_ahead_wasted")

    def _mark_used(self, key: str) -> None:
        if self._fetched_ahead.pop(key, None) is not None:
            self.stats.add("read_ahead_used")


