"""``fedmount locate``: which cluster's Keep holds a collection's blocks, what this host has
cached, which cluster would serve each block, and how long the rest would take to pull.

Algorithm, per collection ID (UUID or PDH of any cluster), up to `COLLECTIONS_AT_ONCE`
collections in parallel:

1. Resolve it the way a mount would (`LocalityView.resolve`): manifest, PDH, read route.
   Its distinct blocks (``hash+size``) are the question. The empty block needs no Keep.
2. Cache: `BlockCache.cached_bytes(key)` per block; a block is cached when all of it is.
3. Per cluster (all of the federation, or only ``--cluster X``), in parallel: ask that
   cluster's controller directly for the collection by PDH (`LocalityView.copy_at`; the
   remote cluster signs for the salted token it received), then HEAD every block at that
   cluster's own keep services with those signatures and that token. HEADs run in
   parallel under one `trio.CapacityLimiter` shared by every cluster and collection, so a
   big collection never opens more than `concurrency` requests at once. A cluster without
   its own copy holds none of the blocks (no HEAD is sent). A HEAD that fails (not "not
   found": unreachable, 5xx, bad signature) leaves its block *unknown* and the answer
   incomplete.
4. Route, in auto mode (`ways.confirm_ways`): per remote cluster whose ``+R`` blocks the
   collection names, the way the mount would read them (directly from its keep services, or
   through the home keepstore) and why, confirmed by a HEAD of one of its blocks along it.
5. Serving: a cached block is served by the cache. Otherwise by the route's cluster, or
   for a ``+R`` locator without ``+A`` by the signing cluster: through the home keepstore
   (``via``) in home mode and in auto mode for a cluster read through the home, from its
   own keep services in auto mode for a cluster read directly.
6. Estimates: uncached bytes / `ThroughputBook` rate of the cluster whose keep services
   are contacted (per cluster: the uncached bytes it holds; for the route: the uncached
   bytes of each cluster contacted along it, and their sum), each labelled ``observed``
   or ``default``.

The answer is a `LocateReport` (`locate_report`: the typed summaries, the JSON schema
and the text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import IdError, Locator, parse_collection_id
from fedmount.arvados.manifest import ManifestError, parse_manifest
from fedmount.arvados.routes import KeepRoute
from fedmount.blocks.throughput import ThroughputBook

from .locate_report import CollectionReport, Holding, LocateReport
from .view import LocalityView, LookupFailure
from .ways import DIRECT, BlockProbe, RemoteWay, confirm_ways

COLLECTIONS_AT_ONCE = 8  # collections resolved and asked about at once (API calls stay bounded too)


class CacheProbe(Protocol):
    def cached_bytes(self, key: str) -> int: ...


def serving_cluster(
    loc: Locator, route: KeepRoute, ways: dict[str, RemoteWay] | None = None
) -> tuple[str, str | None]:
    """(cluster the bytes come from, cluster whose keepstore proxies them or None); `ways`:
    auto mode's way per remote cluster."""
    remote = loc.remote
    way = (ways or {}).get(remote[0]) if remote is not None else None
    if remote is not None and way is not None and way.way == DIRECT:
        return remote[0], None
    if remote is not None and loc.signature is None and remote[0] != route.cluster:
        return remote[0], route.cluster
    return route.cluster, None


async def locate_collections(
    ids: Sequence[str],
    view: LocalityView,
    keep: BlockProbe,
    cache: CacheProbe,
    book: ThroughputBook,
    *,
    cluster: str | None = None,
    concurrency: int = 16,
) -> LocateReport:
    """Answer `locate` for every ID; never raises for bad IDs or unreachable clusters."""
    report = LocateReport(view.home_cluster, view.mode, [CollectionReport(i) for i in ids], book, cluster)
    try:
        clusters = await view.clusters()
    except LookupFailure as exc:
        report.error = str(exc)
        return report
    if cluster is not None:
        if cluster not in clusters:
            report.error = f"cluster {cluster!r} is not in the federation (known: {', '.join(clusters)})"
            return report
        clusters = [cluster]
    limiter = trio.CapacityLimiter(max(1, concurrency))
    collections = trio.CapacityLimiter(COLLECTIONS_AT_ONCE)

    async def one(c: CollectionReport) -> None:
        async with collections:
            await _locate_one(c, clusters, view, keep, cache, limiter)

    async with trio.open_nursery() as nursery:
        for c in report.collections:
            nursery.start_soon(one, c)
    return report


async def _locate_one(
    c: CollectionReport,
    clusters: list[str],
    view: LocalityView,
    keep: BlockProbe,
    cache: CacheProbe,
    limiter: trio.CapacityLimiter,
) -> None:
    try:
        cid = parse_collection_id(c.id)
        record = await view.resolve(cid)
        blocks = parse_manifest(record.manifest_text).blocks()
    except (IdError, LookupFailure, ManifestError) as exc:
        c.error = str(exc)
        return
    c.record = record
    for loc in blocks:
        c.sizes[loc.key] = loc.size
        c.cached[loc.key] = loc.size if loc.is_empty else cache.cached_bytes(loc.key)
    c.holdings = {name: Holding(name) for name in clusters}

    async def ways() -> None:
        c.ways = await confirm_ways(blocks, record.route, view.mode, keep, limiter)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ways)
        for h in c.holdings.values():
            nursery.start_soon(_probe_cluster, h, c, view, keep, limiter)
    for loc in blocks:
        c.serving[loc.key] = serving_cluster(loc, record.route, c.ways)


async def _probe_cluster(
    h: Holding, c: CollectionReport, view: LocalityView, keep: BlockProbe, limiter: trio.CapacityLimiter
) -> None:
    assert c.record is not None
    try:
        copy = await view.copy_at(h.cluster, c.record.portable_data_hash)
    except LookupFailure as exc:
        h.error = str(exc)
        h.unknown = set(c.sizes)
        return
    h.has_collection = copy is not None
    if copy is None:
        h.missing = set(c.sizes)
        return
    signed = {loc.key: loc for loc in copy.locators}
    errors: list[str] = []

    async def head(key: str, loc: Locator) -> None:
        async with limiter:
            try:
                found = await keep.head(loc, copy.route)
            except BlockError as exc:
                errors.append(str(exc))
                h.unknown.add(key)
                return
        (h.held if found else h.missing).add(key)

    async with trio.open_nursery() as nursery:
        for key in c.sizes:
            loc = signed.get(key)
            if loc is None:  # the cluster's copy lacks this block: cannot be the same PDH
                h.missing.add(key)
            elif loc.is_empty:
                h.held.add(key)
            else:
                nursery.start_soon(head, key, loc)
    if errors:
        more = f" (and {len(errors) - 1} more blocks)" if len(errors) > 1 else ""
        h.error = errors[0] + more

