"""``fedmount stage`` / ``fedmount unpin``: pull collections into the host cache ahead of a run.

Algorithm of `stage_with`:

1. Resolve every ID as a mount would (`LocalityView.resolve`, in parallel) and list its
   distinct blocks. A block shared by several collections is fetched once, through the
   route of the first collection that names it.
2. With ``pin``, pin every block *before* fetching anything (the cache's pin table takes
   keys not present yet), so blocks fetched early are never evicted to make room for
   later ones. The cache's index owns the pins: each collection's keys are pinned with its
   portable data hash as their owner, known also by the ID it was asked as.
3. Skip blocks whose every byte is already in the cache (`cached_bytes`): this
   is what makes an interrupted stage resumable. The cache's `put` writes the block file
   and renames it into place before it returns, so every block counted as fetched
   survives SIGINT, and a re-run fetches only what is missing.
4. Fetch the rest with `KeepClient.get` (md5-verified before it returns) under a
   `trio.CapacityLimiter` of ``concurrency`` (each fetch holds up to 64 MiB), then `put`.
   In auto mode (the mount's default) the route carries the mount's `AutoRoutes`, so
   `KeepClient.get` reads a remote cluster's ``+R`` blocks from its own keep services while
   they answer, through the home otherwise, exactly as the mount will; `ways.decide`
   settles that choice for every remote cluster first. A block that cannot be read is
   reported against its collection(s); the others go on.
5. A `Progress` line on stderr shows bytes, rate and ETA. A `TransferMeter` measures the
   aggregate rate per cluster (the cluster whose keep services deliver the block,
   `ways.reading_cluster`; a block whose direct read failed and came through the home
   counts its time to the remote and its bytes nowhere) and stores it in the
   `ThroughputBook`, which `locate` uses for its estimates, even after an interrupt.
6. Afterwards the blocks are checked again on disk (a fresh disk-only view of the cache
   directory: this process's memory tier would hide evictions): any that a too-small
   cache already evicted are reported (raise the cache size or use ``--pin``).

Pins and `unpin`: a block stays pinned while any owner pins it, so two staged collections
sharing a block keep it until both are unpinned. `unpin_collections` releases a
collection's pins (found by its PDH or the ID it was staged as: offline), and falls back to
resolving the ID for blocks pinned some other way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, TextIO

import trio

from fedmount.api.federation import Mode
from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import CollectionId, IdError, Locator, parse_collection_id
from fedmount.arvados.manifest import ManifestError, parse_manifest
from fedmount.arvados.routes import KeepRoute
from fedmount.arvados.settings import Settings
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.throughput import ThroughputBook, TransferMeter
from fedmount.stats import Stats

from .arguments import DEFAULT_STAGE_CONCURRENCY
from .federation_view import FederationView, keep_client_for
from .progress import Progress
from .stage_report import Outcome, StagedCollection, StageReport
from .view import LocalityView, LookupFailure
from .ways import decide, reading_cluster

log = logging.getLogger("fedmount.locality")



class BlockFetcher(Protocol):
    async def get(self, locator: Locator, route: KeepRoute) -> bytes | bytearray: ...


class StageCache(Protocol):
    directory: str | None

    def cached_bytes(self, key: str) -> int: ...
    async def put(self, key: str, data: bytes | bytearray) -> None: ...
    def pin(self, keys: Sequence[str], owner: str = "", names: Sequence[str] = ()) -> None: ...
    def unpin(self, keys: Sequence[str], owner: str = "") -> list[str]: ...
    def pins_of(self, name: str) -> tuple[str, list[str]] | None: ...


async def resolve_blocks(
    ids: Sequence[str], view: LocalityView, concurrency: int
) -> tuple[list[StagedCollection], dict[str, tuple[Locator, KeepRoute]]]:
    """Every collection's blocks; `plan` maps each distinct key to (locator, route) to fetch it by."""
    staged = [StagedCollection(i) for i in ids]
    manifests: dict[int, list[Locator]] = {}
    routes: dict[int, KeepRoute] = {}
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def one(n: int, s: StagedCollection) -> None:
        async with limiter:
            try:
                record = await view.resolve(parse_collection_id(s.id))
                manifests[n] = parse_manifest(record.manifest_text).blocks()
            except (IdError, LookupFailure, ManifestError) as exc:
                s.error = str(exc)
                return
        s.uuid, s.portable_data_hash = record.uuid, record.portable_data_hash
        routes[n] = record.route

    async with trio.open_nursery() as nursery:
        for n, s in enumerate(staged):
            nursery.start_soon(one, n, s)
    plan: dict[str, tuple[Locator, KeepRoute]] = {}
    for n, s in enumerate(staged):  # in the order asked, so the first collection's route wins
        for loc in manifests.get(n, ()):
            s.keys.append(loc.key)
            s.sizes[loc.key] = loc.size
            plan.setdefault(loc.key, (loc, routes[n]))
    return staged, plan


async def stage_with(
    ids: Sequence[str],
    view: LocalityView,
    keep: BlockFetcher,
    cache: StageCache,
    *,
    pin: bool = False,
    concurrency: int = DEFAULT_STAGE_CONCURRENCY,
    progress_stream: TextIO | None = sys.stderr,
    book: ThroughputBook | None = None,
) -> StageReport:
    """Stage `ids` into `cache` through `view` and `keep` (see the module docstring)."""
    if cache.directory is None:
        return StageReport(
            [StagedCollection(i) for i in ids],
            pin,
            error="the block cache has no disk tier (disk limit 0 or unwritable directory); "
            "staging needs one: give a writable --disk-cache-dir (fedmount-run: --cache-dir) "
            "and a disk size above 0",
        )
    book = book if book is not None else ThroughputBook.in_cache_dir(cache.directory)
    staged, plan = await resolve_blocks(ids, view, concurrency)
    report = StageReport(staged, pin)
    if pin:
        for s in staged:
            if s.portable_data_hash is not None:
                cache.pin(s.keys, owner=s.portable_data_hash, names=[s.id])
    todo: list[tuple[Locator, KeepRoute]] = []
    for key, (loc, route) in plan.items():
        if loc.is_empty or cache.cached_bytes(key) >= loc.size:
            report.outcome[key] = Outcome.CACHED
        else:
            todo.append((loc, route))
    total = sum(loc.size for loc, _ in plan.values())
    progress = Progress(total, len(plan), stream=progress_stream) if progress_stream is not None else None
    if progress is not None:
        skipped = [key for key, outcome in report.outcome.items() if outcome is Outcome.CACHED]
        progress.skip(sum(plan[k][0].size for k in skipped), len(skipped))
    meter = TransferMeter()
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def fetch(loc: Locator, route: KeepRoute) -> None:
        async with limiter:
            source = reading_cluster(loc, route)
            meter.start(source)
            data: bytes | bytearray = b""
            try:
                data = await keep.get(loc, route)
            except BlockError as exc:
                report.outcome[loc.key] = Outcome.FAILED
                report.failures[loc.key] = str(exc)
                if progress is not None:
                    progress.fail()
                return
            finally:
                meter.finish(source, len(data) if reading_cluster(loc, route) == source else 0)
            await cache.put(loc.key, data)
        report.outcome[loc.key] = Outcome.FETCHED
        if progress is not None:
            progress.advance(loc.size)

    await decide(todo)
    if progress is not None:
        progress.fetch_started()
    try:
        async with trio.open_nursery() as nursery:
            for loc, route in todo:
                nursery.start_soon(fetch, loc, route)
    finally:
        meter.record_into(book)
        book.save()
        if progress is not None:
            progress.finish()
    on_disk = TieredCache(cache.directory, sys.maxsize, 0)  # the disk tier alone, as a later mount sees it
    for key, outcome in report.outcome.items():
        if outcome is Outcome.FETCHED and on_disk.cached_bytes(key) < plan[key][0].size:
            report.outcome[key] = Outcome.EVICTED
    return report


async def stage_collections(
    ids: Sequence[str],
    settings: Settings,
    cache: StageCache,
    *,
    pin: bool = False,
    mode: Mode = "auto",
    keep: KeepClient | None = None,
    stats: Stats | None = None,
    concurrency: int = DEFAULT_STAGE_CONCURRENCY,
    progress_stream: TextIO | None = sys.stderr,
) -> StageReport:
    """Pull `ids` (UUIDs or PDHs of any cluster) into `cache`: `fedmount stage`, `fedmount-run --stage`.

    Connects to the federation with `settings` in `mode` ("auto", the mount's default, "home"
    or "direct": read the way the mount will), fetches through `keep` (a new KeepClient if None) and returns a
    `StageReport` (``.complete``, ``.summaries()``, ``.render()``, ``.to_json()``). Bad IDs, unknown
    collections and unreadable blocks are in the report, not raised; `LookupFailure` is
    raised only when the home cluster itself cannot be used."""
    async with FederationView.open(settings, mode=mode, stats=stats) as view:
        return await stage_with(
            ids,
            view,
            keep if keep is not None else keep_client_for(settings, stats),
            cache,
            pin=pin,
            concurrency=concurrency,
            progress_stream=progress_stream,
        )


@dataclass
class Unpinned:
    id: str
    blocks: int = 0  # keys released from the cache's pin table
    error: str | None = None


async def unpin_collections(
    ids: Sequence[str],
    cache: StageCache,
    open_view: Callable[[], AbstractAsyncContextManager[LocalityView]] | None = None,
) -> list[Unpinned]:
    """Release the pins `stage --pin` took for `ids`, keeping keys another recorded pin needs.

    IDs the cache's index knows as pin owners need no network. Others are resolved through
    `open_view()` (if given) and their blocks unpinned, again minus other owners' pins."""
    results = [Unpinned(i) for i in ids]
    pending: list[tuple[Unpinned, CollectionId]] = []
    for r in results:
        try:
            cid = parse_collection_id(r.id)
        except IdError as exc:
            r.error = str(exc)
            continue
        recorded = cache.pins_of(cid.text)
        if recorded is None:
            pending.append((r, cid))
            continue
        owner, keys = recorded
        r.blocks = len(cache.unpin(keys, owner))
    if not pending:
        return results
    if open_view is None:
        for r, _ in pending:
            r.error = "not pinned by `fedmount stage --pin` on this host"
        return results
    try:
        async with open_view() as view:
            for r, cid in pending:
                try:
                    record = await view.resolve(cid)
                    keys = [loc.key for loc in parse_manifest(record.manifest_text).blocks()]
                except (LookupFailure, ManifestError) as exc:
                    r.error = str(exc)
                    continue
                r.blocks = len(cache.unpin(keys, record.portable_data_hash))
    except LookupFailure as exc:
        for r, _ in pending:
            r.error = r.error or str(exc)
    return results
