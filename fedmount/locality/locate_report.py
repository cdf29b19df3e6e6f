"""What ``fedmount locate`` found, as typed values; the JSON document and the text derive from them.

`locate` fills a `LocateReport` while it asks (`CollectionReport`, `Holding`: block keys
per state); `LocateReport.summaries` turns each collection into a `LocatedCollection` of
`Tally`, `Estimate`, `ClusterSummary` and `BlockSummary` values, and both `to_json` and
`render` read those, never each other.

JSON schema (``--json``; ``schema`` changes when a field changes meaning or goes away;
new fields may be added)::

    {"schema": "fedmount-locate/1", "home_cluster": "zzzzz", "mode": "auto"|"home"|"direct",
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
        "route": {"cluster": "zzzzz", "mode": "home",
                  # auto mode only: the way of each remote cluster whose +R blocks it names
                  "remotes": {"zbbbb": {"way": "direct"|"home", "reason": "one line",
                                        "error": null | "one line"}}},  # the HEAD along it failed
        "served_by": {"cache": {"blocks": 3, "bytes": 4096},
                      "zbbbb": {"blocks": 9, "bytes": 999, "via": "zzzzz"|null}},
        "estimate": {"bytes": 119360, "seconds": 1.2, "cluster": "zzzzz"|null,
                     "bytes_per_second": 1e8, "throughput": "observed"|"default"},
        "estimate_by_cluster": {"zzzzz": {...as estimate}},  # per cluster contacted
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

The route's estimate is the time to pull every uncached block along the way the mount reads
it, from the keep services of each cluster contacted (``estimate_by_cluster``: the
cluster's own for a block read directly, the proxying home's for one read ``via`` it), one
after the other: its ``cluster`` is null when there are several, its rate their combined
rate, ``observed`` when each one is.

When the home cluster itself cannot be used, the document is `failed_locate_json`'s:
``{"schema", "complete": false, "error", "collections": []}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from fedmount.api.federation import CollectionRecord
from fedmount.blocks.throughput import ThroughputBook

from .progress import human_bytes, human_duration
from .tally import Tally
from .ways import DIRECT, RemoteWay

SCHEMA = "fedmount-locate/1"
CACHE = "cache"  # the name `served_by` gives this host's cache


def failed_locate_json(error: str) -> dict:
    """The document of a locate that could not start (the home cluster cannot be used)."""
    return {"schema": SCHEMA, "complete": False, "error": error, "collections": []}


@dataclass
class Holding:
    """What one cluster's Keep holds of one collection (block keys), as `locate` finds out."""

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
    """One collection as `locate` fills it in."""

    id: str
    error: str | None = None
    record: CollectionRecord | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # block key -> size, manifest order
    cached: dict[str, int] = field(default_factory=dict)  # block key -> bytes in this host's cache
    serving: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # key -> (cluster, via)
    holdings: dict[str, Holding] = field(default_factory=dict)
    ways: dict[str, RemoteWay] = field(default_factory=dict)  # auto mode: per remote cluster

    @property
    def complete(self) -> bool:
        return (self.error is None and all(h.error is None and not h.unknown for h in self.holdings.values())
                and all(w.error is None for w in self.ways.values()))  # fmt: skip

    def is_cached(self, key: str) -> bool:
        return self.cached.get(key, 0) >= self.sizes[key]

    def cached_bytes(self, key: str) -> int:
        return min(self.cached.get(key, 0), self.sizes[key])

    def uncached_bytes(self, keys: Iterable[str] | None = None) -> int:
        keys = self.sizes.keys() if keys is None else keys
        return sum(self.sizes[k] - self.cached_bytes(k) for k in keys)

    def tally(self, keys: Iterable[str]) -> Tally:
        return Tally.of(self.sizes[k] for k in keys)


@dataclass(frozen=True)
class Estimate:
    """How long pulling `bytes` from `cluster` takes at the rate the `ThroughputBook` has."""

    bytes: int
    seconds: float
    cluster: str | None  # None: the sum of several clusters' estimates
    bytes_per_second: int
    throughput: str  # "observed" or "default"

    @classmethod
    def of(cls, book: ThroughputBook, cluster: str, nbytes: int) -> Estimate:
        tp = book.get(cluster)
        return cls(nbytes, round(tp.seconds_for(nbytes), 3), cluster, round(tp.bytes_per_second), tp.source)

    @classmethod
    def total(cls, parts: list[Estimate]) -> Estimate:
        """Pulling every part one after the other (at least one part)."""
        if len(parts) == 1:
            return parts[0]
        nbytes, seconds = sum(p.bytes for p in parts), sum(p.seconds for p in parts)
        observed = all(p.throughput == "observed" for p in parts)
        return cls(nbytes, round(seconds, 3), None, round(nbytes / seconds) if seconds else 0,
                   "observed" if observed else "default")  # fmt: skip

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        if self.bytes == 0:
            return "nothing to pull"
        return (
            f"{human_duration(self.seconds)} for {human_bytes(self.bytes)} at "
            f"{human_bytes(self.bytes_per_second)}/s ({self.throughput})"
        )


@dataclass(frozen=True)
class ServedBy:
    """The blocks of a collection one source serves: the cache, or a cluster (`via`: the
    cluster whose keepstore proxies them, if any)."""

    tally: Tally
    via: str | None

    def to_json(self, from_cache: bool) -> dict:
        return self.tally.to_json() if from_cache else self.tally.to_json() | {"via": self.via}


@dataclass(frozen=True)
class ClusterSummary:
    """What one cluster's Keep holds of one collection."""

    cluster: str
    has_collection: bool | None  # None: could not ask
    holds_all: bool | None  # None: unknown
    held: Tally
    missing: Tally
    unknown: Tally
    error: str | None
    estimate: Estimate  # pulling the uncached blocks it holds

    def to_json(self) -> dict:
        return {
            "has_collection": self.has_collection,
            "holds_all": self.holds_all,
            "blocks_held": self.held.blocks,
            "bytes_held": self.held.bytes,
            "blocks_missing": self.missing.blocks,
            "bytes_missing": self.missing.bytes,
            "blocks_unknown": self.unknown.blocks,
            "bytes_unknown": self.unknown.bytes,
            "error": self.error,
            "estimate": self.estimate.to_json(),
        }


@dataclass(frozen=True)
class BlockSummary:
    block: str
    size: int
    cached_bytes: int
    served_by: str  # CACHE or a cluster
    via: str | None
    held_by: list[str]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LocatedCollection:
    """One collection's answer; `record` is None when it could not be resolved (`error`)."""

    id: str
    error: str | None
    complete: bool
    record: CollectionRecord | None = None
    total: Tally = Tally()
    cached: Tally = Tally()
    served_by: dict[str, ServedBy] = field(default_factory=dict)  # CACHE or cluster, first use first
    estimate: Estimate | None = None  # pulling every uncached block through the read route
    estimates: dict[str, Estimate] = field(default_factory=dict)  # its parts, per cluster contacted
    clusters: dict[str, ClusterSummary] = field(default_factory=dict)
    blocks: list[BlockSummary] = field(default_factory=list)
    remote: bool = False  # some block is served by another cluster than the route's
    ways: dict[str, RemoteWay] = field(default_factory=dict)  # auto mode: per remote cluster

    def to_json(self, mode: str) -> dict:
        out: dict = {"id": self.id, "error": self.error, "complete": self.complete}
        r = self.record
        if r is None:
            return out
        assert self.estimate is not None
        route = {"cluster": r.route.cluster, "mode": mode}
        if mode == "auto":
            route["remotes"] = {name: w.to_json() for name, w in self.ways.items()}
        return out | {
            "uuid": r.uuid,
            "portable_data_hash": r.portable_data_hash,
            "owner_cluster": r.cluster,
            "blocks": self.total.blocks,
            "bytes": self.total.bytes,
            "cached": self.cached.to_json(),
            "route": route,
            "served_by": {name: s.to_json(name == CACHE) for name, s in self.served_by.items()},
            "estimate": self.estimate.to_json(),
            "estimate_by_cluster": {name: e.to_json() for name, e in self.estimates.items()},
            "clusters": {name: h.to_json() for name, h in self.clusters.items()},
            "block_list": [b.to_json() for b in self.blocks],
        }


def summarize(c: CollectionReport, book: ThroughputBook) -> LocatedCollection:
    if c.record is None:
        return LocatedCollection(c.id, c.error, c.complete)
    served: dict[str, list[str]] = {}
    contacted: dict[str, list[str]] = {}  # cluster whose keep services are asked -> uncached keys
    blocks = []
    for key, size in c.sizes.items():
        name, via = (CACHE, None) if c.is_cached(key) else c.serving[key]
        served.setdefault(name, []).append(key)
        if name != CACHE and size:
            contacted.setdefault(via or name, []).append(key)
        held_by = [h.cluster for h in c.holdings.values() if key in h.held]
        blocks.append(BlockSummary(key, size, c.cached_bytes(key), name, via, held_by))
    clusters = {
        name: ClusterSummary(
            name, h.has_collection, h.holds_all, c.tally(h.held), c.tally(h.missing), c.tally(h.unknown),
            h.error, Estimate.of(book, name, c.uncached_bytes(h.held)),
        )
        for name, h in c.holdings.items()
    }  # fmt: skip
    estimates = {name: Estimate.of(book, name, c.uncached_bytes(keys)) for name, keys in contacted.items()}
    return LocatedCollection(
        c.id, c.error, c.complete, c.record,
        total=Tally.of(c.sizes.values()),
        cached=Tally(sum(1 for k in c.sizes if c.is_cached(k)), sum(c.cached_bytes(k) for k in c.sizes)),
        served_by={
            name: ServedBy(c.tally(keys), None if name == CACHE else c.serving[keys[0]][1])
            for name, keys in served.items()
        },
        estimate=Estimate.total(list(estimates.values()) or [Estimate.of(book, c.record.route.cluster, 0)]),
        estimates=estimates,
        clusters=clusters,
        blocks=blocks,
        remote=any(name != c.record.route.cluster for name, _ in c.serving.values()),
        ways=c.ways,
    )  # fmt: skip


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

    def summaries(self) -> list[LocatedCollection]:
        return [summarize(c, self.book) for c in self.collections]

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "home_cluster": self.home_cluster,
            "mode": self.mode,
            "cluster": self.cluster,
            "answer": self.answer,
            "complete": self.complete,
            "error": self.error,
            "collections": [s.to_json(self.mode) for s in self.summaries()],
        }

    def render(self) -> str:
        """The human report: one compact table per collection."""
        lines: list[str] = []
        if self.error:
            lines.append(f"error: {self.error}")
        summaries = self.summaries()
        for s in summaries:
            lines.extend(self._render_collection(s))
            lines.append("")
        defaults = sorted({e.cluster for s in summaries for e in _estimates_shown(s)
                           if not self.book.get(e.cluster).observed})
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

    def _render_collection(self, s: LocatedCollection) -> list[str]:
        r = s.record
        if r is None:
            return [f"{s.id}: error: {s.error}"]
        assert s.estimate is not None
        head = f"{s.id}"
        if r.uuid != s.id:
            head += f" ({r.uuid})"
        if r.portable_data_hash not in (s.id, r.uuid):
            head += f"  pdh {r.portable_data_hash}"
        lines = [
            head,
            f"  {s.total.blocks} blocks, {human_bytes(s.total.bytes)}; in this host's cache: "
            f"{s.cached.blocks} blocks, {human_bytes(s.cached.bytes)}",
        ]
        rows = [("cluster", "blocks held", "bytes held", "missing", "est. pull of uncached")]
        for name, h in s.clusters.items():
            mark = "*" if name == self.home_cluster else ""
            if h.error and h.has_collection is None:
                rows.append((name + mark, "?", "?", "?", f"error: {h.error}"))
                continue
            held = f"{h.held.blocks}/{s.total.blocks}"
            if h.unknown.blocks:
                held += f" ({h.unknown.blocks} unknown)"
            if h.has_collection is False:
                est = "collection not on this cluster"
            elif h.held.blocks == 0 and s.total.bytes:
                est = "-"
            else:
                est = h.estimate.render()
            if h.error:
                est += f"; error: {h.error}"
            rows.append((name + mark, held, human_bytes(h.held.bytes), str(h.missing.blocks), est))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
            lines.append("  " + "  ".join(cells) + "  " + row[4])
        served = []
        for name, by in s.served_by.items():
            via = f" via {by.via}" if by.via else ""
            served.append(f"{name}{via} {by.tally.blocks} blocks ({human_bytes(by.tally.bytes)})")
        lines.append(f"  read route ({self.mode} mode): " + ", ".join(served or ["nothing to read"]))
        for name, w in s.ways.items():
            way = "directly" if w.way == DIRECT else f"through {r.route.cluster}"
            error = f"; error: {w.error}" if w.error else ""
            lines.append(f"  {name}'s blocks: read {way} ({w.reason}){error}")
        parts = ""
        if len(s.estimates) > 1:
            parts = " (" + ", ".join(f"{name} {e.render()}" for name, e in s.estimates.items()) + ")"
        lines.append(f"  est. to pull what is not cached: {s.estimate.render()}{parts}")
        home = s.clusters.get(self.home_cluster)
        home_has_all = home is not None and home.holds_all is True
        if self.mode != "direct" and s.remote and home_has_all and s.id != r.portable_data_hash:
            lines.append(
                f"  note: {self.home_cluster} has its own copy; read it by PDH {r.portable_data_hash} "
                "to read it from there"
            )
        return lines


def _estimates_shown(s: LocatedCollection) -> list[Estimate]:
    """The estimates the text of `s` relies on (those with bytes to pull)."""
    shown = [h.estimate for h in s.clusters.values()] + list(s.estimates.values())
    return [e for e in shown if e.bytes]
