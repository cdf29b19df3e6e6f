"""What ``fedmount stage`` did, as typed values; the JSON document and the text derive from them.

`stage_with` records one `Outcome` per distinct block (`StageReport.outcome`) and each
collection's blocks (`StagedCollection`); `StageReport.summaries` gives a `StageSummary` per
collection (a `Tally` per outcome, the failures, complete or not), which `to_json`, `render`
and ``fedmount-run --stage`` read.

JSON schema (``--json``)::

    {"schema": "fedmount-stage/1", "complete": true, "error": null | "one line",
     "collections": [{"id": "as given", "error": null | "one line",   # error: nothing else
        "uuid": ..., "portable_data_hash": ..., "blocks": 12, "bytes": 123456,
        "already_cached": {"blocks": 3, "bytes": 4096}, "fetched": {...}, "evicted": {...},
        "failed": ["one line per unreadable block"], "pinned": false, "complete": true}]}

With ``--to-cluster X`` the document also has ``"cluster": "X"`` after ``schema``, and its
counts are of X's Keep: ``already_cached`` blocks were there before, ``fetched`` ones X copied
now (``evicted`` stays zero); with ``--save-as NAME``, ``"saved": {"name", "uuid",
"portable_data_hash"}`` at the end names the collection made on X.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .progress import human_bytes
from .tally import Tally

SCHEMA = "fedmount-stage/1"


class Outcome(enum.Enum):
    """What became of one block."""

    CACHED = "cached"  # every byte was in the cache before the stage
    FETCHED = "fetched"  # read from Keep, verified, written to the cache
    FAILED = "failed"  # could not be read (`StageReport.failures` says why)
    EVICTED = "evicted"  # fetched, then evicted again before the stage ended

    @property
    def in_cache(self) -> bool:
        return self in (Outcome.CACHED, Outcome.FETCHED)


@dataclass
class StagedCollection:
    """One collection as `stage_with` fills it in."""

    id: str
    error: str | None = None
    uuid: str | None = None
    portable_data_hash: str | None = None
    keys: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSummary:
    """One collection's result; without `error`, every block counted under one `Outcome`."""

    id: str
    error: str | None
    uuid: str | None = None
    portable_data_hash: str | None = None
    total: Tally = Tally()
    outcomes: dict[Outcome, Tally] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # one line per unreadable block
    pinned: bool = False
    complete: bool = False
    target: str | None = None  # the cluster whose Keep was staged into; None: this host's cache

    def count(self, outcome: Outcome) -> Tally:
        return self.outcomes.get(outcome, Tally())

    def to_json(self) -> dict:
        out: dict = {"id": self.id, "error": self.error}
        if self.error is not None:
            return out
        return out | {
            "uuid": self.uuid,
            "portable_data_hash": self.portable_data_hash,
            "blocks": self.total.blocks,
            "bytes": self.total.bytes,
            "already_cached": self.count(Outcome.CACHED).to_json(),
            "fetched": self.count(Outcome.FETCHED).to_json(),
            "evicted": self.count(Outcome.EVICTED).to_json(),
            "failed": self.failed,
            "pinned": self.pinned,
            "complete": self.complete,
        }

    def render(self) -> list[str]:
        if self.error is not None:
            return [f"{self.id}: error: {self.error}"]
        state = "staged" if self.complete else "NOT fully staged"
        where, fetched, cached = "", "fetched", "already cached"
        if self.target is not None:
            where, fetched, cached = f" in {self.target}'s Keep", "copied", "already there"
        text = (
            f"{self.id}: {state}{where}: {self.total.blocks} blocks, {human_bytes(self.total.bytes)} "
            f"({fetched} {human_bytes(self.count(Outcome.FETCHED).bytes)}, {cached} "
            f"{human_bytes(self.count(Outcome.CACHED).bytes)})"
        )
        if self.pinned:
            text += ", pinned until `fedmount unpin`"
        lines = [text]
        evicted = self.count(Outcome.EVICTED).blocks
        if evicted:
            lines.append(
                f"  {evicted} blocks were evicted again: the cache is smaller than "
                "what was staged; raise the cache size or stage with --pin"
            )
        lines.extend(f"  {msg}" for msg in self.failed[:5])
        if len(self.failed) > 5:
            lines.append(f"  ... and {len(self.failed) - 5} more unreadable blocks")
        return lines


@dataclass
class StageReport:
    collections: list[StagedCollection]
    pinned: bool
    outcome: dict[str, Outcome] = field(default_factory=dict)  # distinct block key -> its outcome
    failures: dict[str, str] = field(default_factory=dict)  # key -> one-line error
    error: str | None = None  # stopped everything (no disk cache, ...)
    target: str | None = None  # staged into this cluster's Keep (--to-cluster); None: the host cache
    saved: dict | None = None  # --save-as: {"name", "uuid", "portable_data_hash"} of the new collection

    @property
    def complete(self) -> bool:
        return self.error is None and all(self._complete(c) for c in self.collections)

    def _complete(self, c: StagedCollection) -> bool:
        return c.error is None and all(k in self.outcome and self.outcome[k].in_cache for k in c.keys)

    def exit_status(self) -> int:
        return 0 if self.complete else 2

    def summary(self, c: StagedCollection) -> StageSummary:
        if c.error is not None:
            return StageSummary(c.id, c.error)
        by_outcome: dict[Outcome, list[int]] = {}
        for k in c.keys:
            if k in self.outcome:
                by_outcome.setdefault(self.outcome[k], []).append(c.sizes[k])
        return StageSummary(
            c.id, None, c.uuid, c.portable_data_hash,
            total=Tally(len(c.keys), sum(c.sizes.values())),
            outcomes={outcome: Tally.of(sizes) for outcome, sizes in by_outcome.items()},
            failed=[self.failures[k] for k in c.keys if k in self.failures],
            pinned=self.pinned,
            complete=self._complete(c),
            target=self.target,
        )  # fmt: skip

    def summaries(self) -> list[StageSummary]:
        return [self.summary(c) for c in self.collections]

    def distinct(self) -> Tally:
        """Every distinct block of every collection (a block two collections share counts once)."""
        sizes = {k: size for c in self.collections for k, size in c.sizes.items()}
        return Tally.of(sizes.values())

    def tally(self, outcome: Outcome) -> Tally:
        """The distinct blocks with this outcome."""
        sizes = {k: size for c in self.collections for k, size in c.sizes.items()}
        return Tally.of(sizes[k] for k, o in self.outcome.items() if o is outcome)

    def to_json(self) -> dict:
        where = {} if self.target is None else {"cluster": self.target}
        return {
            "schema": SCHEMA,
            **where,
            "complete": self.complete,
            "error": self.error,
            "collections": [s.to_json() for s in self.summaries()],
            **({} if self.saved is None else {"saved": self.saved}),
        }

    def render(self) -> str:
        lines = [f"error: {self.error}"] if self.error else []
        for s in self.summaries():
            lines.extend(s.render())
        if self.saved is not None:
            lines.append(f"saved as {self.saved['name']!r} on {self.target}: {self.saved['uuid']} "
                         f"({self.saved['portable_data_hash']})")  # fmt: skip
        return "\n".join(lines) + "\n"
