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
4. Serving: a cached block is served by the cache. Otherwise by the route's cluster, or,
   in home mode for a ``+R`` locator without ``+A``, by the signing cluster through the
   home keepstore (``via``).
5. Estimates: uncached bytes / `ThroughputBook` rate of the cluster whose keep services
   are contacted (per cluster: the uncached bytes it holds; for the route: all uncached
   bytes), each labelled ``observed`` or ``default``.

JSON schema (``--json``; ``schema`` changes when a field changes meaning or goes away;
new fields may be added)::

    {"schema": "fedmount-locate/1", "home_cluster": "zzzzz", "mode": "home"|"direct",
     "cluster": "zbbbb"|null,          # --cluster, if given
     "answer": "yes"|"no"|"unknown"|null,   # --cluster only: does it hold every block?
     "complete": true,                 # every question below was answered
     "error": null | "one line",       # bad input that stopped everything
     "collections": [{
        "id": "as given", "uuid": ..., "portable_data_hash": ..., "owner_cluster": ...,
        "error": null | "one line",    # could not be resolved: nothing else is filled in
        "complete": true,
        "blocks": 12, "bytes": 123456,
        "cached": {"blocks": 3, "bytes": 4096},   # bytes include partly cached blocks
        "route": {"cluster": "zzzzz", "mode": "home"},
        "served_by": {"cache": {"blocks": 3, "bytes": 4096},
                      "zbbbb": {"blocks": 9, "bytes": 999, "via": "zzzzz"|null}},
        "estimate": {"bytes": 119360, "seconds": 1.2, "cluster": "zzzzz",
                     "bytes_per_second": 1e8, "throughput": "observed"|"default"},
        "clusters": {"zbbbb": {
            "has_collection": true|false|null,     # null: could not ask
            "holds_all": true|false|null,          # null: unknown
            "blocks_held": 12, "bytes_held": 123456,
            "blocks_missing": 0, "bytes_missing": 0,
            "blocks_unknown": 0, "bytes_unknown": 0,
            "error": null | "one line",
            "estimate": {"bytes": ..., "seconds": ..., "cluster": "zbbbb",
                         "bytes_per_second": ..., "throughput": ...}}},
        "block_list": [{"block": "hash+size", "size": 123, "cached_bytes": 0,
                        "served_by": "zbbbb", "via": "zzzzz"|null, "held_by": ["zbbbb"]}]
     }]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import IdError, Locator, parse_collection_id
from fedmount.arvados.manifest import ManifestError, parse_manifest
from fedmount.arvados.routes import KeepRoute
from fedmount.blocks.throughput import ThroughputBook

from .progress import human_bytes, human_duration
from .view import LocalityView, LookupFailure, Resolved

SCHEMA = "fedmount-locate/1"
COLLECTIONS_AT_ONCE = 8  # collections resolved and asked about at once (API calls stay bounded too)


class BlockProbe(Protocol):
    async def head(self, locator: Locator, route: KeepRoute) -> bool: ...


class CacheProbe(Protocol):
    def cached_bytes(self, key: str) -> int: ...


def serving_cluster(loc: Locator, route: KeepRoute) -> tuple[str, str | None]:
    """(cluster the bytes come from, cluster whose keepstore proxies them or None)."""
    remote = loc.remote
    if remote is not None and loc.signature is None and remote[0] != route.cluster:
        return remote[0], route.cluster
    return route.cluster, None


@dataclass
class Holding:
    """What one cluster's Keep holds of one collection."""

    cluster: str
    has_collection: bool | None = None
    held: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    error: str | None = None

    @property
    def holds_all(self) -> bool | None:
        if self.missing:
            return False
        return None if self.unknown else True


@dataclass
class CollectionReport:
    id: str
    error: str | None = None
    resolved: Resolved | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # block key -> size, manifest order
    cached: dict[str, int] = field(default_factory=dict)  # block key -> bytes in this host's cache
    serving: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # key -> (cluster, via)
    holdings: dict[str, Holding] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.error is None and all(h.error is None and not h.unknown for h in self.holdings.values())

    def is_cached(self, key: str) -> bool:
        return self.cached.get(key, 0) >= self.sizes[key]

    def uncached_bytes(self, keys: Sequence[str] | set[str] | None = None) -> int:
        keys = self.sizes.keys() if keys is None else keys
        return sum(self.sizes[k] - min(self.cached.get(k, 0), self.sizes[k]) for k in keys)


def _estimate(book: ThroughputBook, cluster: str, nbytes: int) -> dict:
    tp = book.get(cluster)
    return {
        "bytes": nbytes,
        "seconds": round(tp.seconds_for(nbytes), 3),
        "cluster": cluster,
        "bytes_per_second": round(tp.bytes_per_second),
        "throughput": tp.source,
    }


@dataclass
class LocateReport:
    home_cluster: str
    mode: str
    collections: list[CollectionReport]
    book: ThroughputBook
    cluster: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and all(c.complete for c in self.collections)

    @property
    def answer(self) -> str | None:
        """For ``--cluster X``: "yes" (X holds every block), "no", or "unknown"."""
        if self.cluster is None:
            return None
        if not self.complete:
            return "unknown"
        held = all(c.holdings[self.cluster].holds_all for c in self.collections)
        return "yes" if held else "no"

    def exit_status(self) -> int:
        """0 complete (and "yes" for --cluster), 1 "no" for --cluster, 2 incomplete or bad input."""
        if not self.complete:
            return 2
        return 1 if self.answer == "no" else 0

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "home_cluster": self.home_cluster,
            "mode": self.mode,
            "cluster": self.cluster,
            "answer": self.answer,
            "complete": self.complete,
            "error": self.error,
            "collections": [self._collection_json(c) for c in self.collections],
        }

    def _collection_json(self, c: CollectionReport) -> dict:
        out: dict = {"id": c.id, "error": c.error, "complete": c.complete}
        if c.resolved is None:
            return out
        r = c.resolved
        served: dict[str, dict] = {}
        for key, size in c.sizes.items():
            name, via = ("cache", None) if c.is_cached(key) else c.serving[key]
            extra = {} if name == "cache" else {"via": via}
            entry = served.setdefault(name, {"blocks": 0, "bytes": 0} | extra)
            entry["blocks"] += 1
            entry["bytes"] += size
        out |= {
            "uuid": r.uuid,
            "portable_data_hash": r.portable_data_hash,
            "owner_cluster": r.owner_cluster,
            "blocks": len(c.sizes),
            "bytes": sum(c.sizes.values()),
            "cached": {
                "blocks": sum(1 for k in c.sizes if c.is_cached(k)),
                "bytes": sum(min(c.cached.get(k, 0), s) for k, s in c.sizes.items()),
            },
            "route": {"cluster": r.route.cluster, "mode": self.mode},
            "served_by": served,
            "estimate": _estimate(self.book, r.route.cluster, c.uncached_bytes()),
            "clusters": {name: self._holding_json(c, h) for name, h in c.holdings.items()},
            "block_list": [
                {
                    "block": key,
                    "size": size,
                    "cached_bytes": min(c.cached.get(key, 0), size),
                    "served_by": "cache" if c.is_cached(key) else c.serving[key][0],
                    "via": None if c.is_cached(key) else c.serving[key][1],
                    "held_by": [h.cluster for h in c.holdings.values() if key in h.held],
                }
                for key, size in c.sizes.items()
            ],
        }
        return out

    def _holding_json(self, c: CollectionReport, h: Holding) -> dict:
        def total(keys: set[str]) -> int:
            return sum(c.sizes[k] for k in keys)

        return {
            "has_collection": h.has_collection,
            "holds_all": h.holds_all,
            "blocks_held": len(h.held),
            "bytes_held": total(h.held),
            "blocks_missing": len(h.missing),
            "bytes_missing": total(h.missing),
            "blocks_unknown": len(h.unknown),
            "bytes_unknown": total(h.unknown),
            "error": h.error,
            "estimate": _estimate(self.book, h.cluster, c.uncached_bytes(h.held)),
        }

    def render(self) -> str:
        """The human report: one compact table per collection."""
        lines: list[str] = []
        if self.error:
            lines.append(f"error: {self.error}")
        for c in self.collections:
            lines.extend(self._render_collection(c))
            lines.append("")
        defaults = sorted({name for c in self.collections for name in self._estimated(c)
                           if not self.book.get(name).observed})
        if defaults:
            lines.append(
                f"estimates for {', '.join(defaults)} use the default "
                f"{human_bytes(self.book.default)}/s (no transfer observed yet; `fedmount stage` measures)"
            )
        if self.cluster is not None:
            lines.append(f"{self.cluster} holds everything: {self.answer}")
        elif not self.complete:
            lines.append("incomplete: some questions above could not be answered")
        return "\n".join(lines).rstrip("\n") + "\n"

    def _estimated(self, c: CollectionReport) -> set[str]:
        """Clusters whose throughput an estimate shown for `c` relies on."""
        if c.resolved is None:
            return set()
        out = {h.cluster for h in c.holdings.values() if c.uncached_bytes(h.held)}
        return out | ({c.resolved.route.cluster} if c.uncached_bytes() else set())

    def _render_collection(self, c: CollectionReport) -> list[str]:
        if c.resolved is None:
            return [f"{c.id}: error: {c.error}"]
        data = self._collection_json(c)
        r = c.resolved
        head = f"{c.id}"
        if r.uuid != c.id:
            head += f" ({r.uuid})"
        if r.portable_data_hash not in (c.id, r.uuid):
            head += f"  pdh {r.portable_data_hash}"
        lines = [
            head,
            f"  {data['blocks']} blocks, {human_bytes(data['bytes'])}; in this host's cache: "
            f"{data['cached']['blocks']} blocks, {human_bytes(data['cached']['bytes'])}",
        ]
        rows = [("cluster", "blocks held", "bytes held", "missing", "est. pull of uncached")]
        for name, h in data["clusters"].items():
            mark = "*" if name == self.home_cluster else ""
            if h["error"] and h["has_collection"] is None:
                rows.append((name + mark, "?", "?", "?", f"error: {h['error']}"))
                continue
            n = data["blocks"]
            held = f"{h['blocks_held']}/{n}"
            if h["blocks_unknown"]:
                held += f" ({h['blocks_unknown']} unknown)"
            if h["has_collection"] is False:
                est = "collection not on this cluster"
            elif h["blocks_held"] == 0 and data["bytes"]:
                est = "-"
            else:
                est = _render_estimate(h["estimate"])
            if h["error"]:
                est += f"; error: {h['error']}"
            rows.append((name + mark, held, human_bytes(h["bytes_held"]), str(h["blocks_missing"]), est))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
            lines.append("  " + "  ".join(cells) + "  " + row[4])
        served = []
        for name, s in data["served_by"].items():
            via = f" via {s['via']}" if s.get("via") else ""
            served.append(f"{name}{via} {s['blocks']} blocks ({human_bytes(s['bytes'])})")
        lines.append(f"  read route ({self.mode} mode): " + ", ".join(served or ["nothing to read"]))
        lines.append(f"  est. to pull what is not cached: {_render_estimate(data['estimate'])}")
        home = c.holdings.get(self.home_cluster)
        proxied = any(via is not None for _, via in c.serving.values())
        home_has_all = home is not None and home.holds_all is True
        if self.mode == "home" and proxied and home_has_all and c.id != r.portable_data_hash:
            lines.append(
                f"  note: {self.home_cluster} has its own copy; read it by PDH {r.portable_data_hash} "
                "to read it from there"
            )
        return lines


def _render_estimate(e: dict) -> str:
    if e["bytes"] == 0:
        return "nothing to pull"
    return (
        f"{human_duration(e['seconds'])} for {human_bytes(e['bytes'])} at "
        f"{human_bytes(e['bytes_per_second'])}/s ({e['throughput']})"
    )


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
        resolved = await view.resolve(cid)
        blocks = parse_manifest(resolved.manifest_text).blocks()
    except (IdError, LookupFailure, ManifestError) as exc:
        c.error = str(exc)
        return
    c.resolved = resolved
    for loc in blocks:
        c.sizes[loc.key] = loc.size
        c.cached[loc.key] = loc.size if loc.is_empty else cache.cached_bytes(loc.key)
        c.serving[loc.key] = serving_cluster(loc, resolved.route)
    c.holdings = {name: Holding(name) for name in clusters}
    async with trio.open_nursery() as nursery:
        for h in c.holdings.values():
            nursery.start_soon(_probe_cluster, h, c, view, keep, limiter)


async def _probe_cluster(
    h: Holding, c: CollectionReport, view: LocalityView, keep: BlockProbe, limiter: trio.CapacityLimiter
) -> None:
    assert c.resolved is not None
    try:
        copy = await view.copy_at(h.cluster, c.resolved.portable_data_hash)
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

