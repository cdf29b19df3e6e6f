"""Loading collections from the federation: records, manifests, and failures as errnos.

`CollectionLoader.load` gets a collection's whole record and parses its manifest;
`CollectionLoader.recheck` asks first only for what decides whether a mounted UUID
collection changed (`FRESHNESS_FIELDS`, the API's ``select``: uuid, portable data hash,
modification time, about 200 bytes whatever the size of the collection or of its
description). Unchanged, nothing else is asked for or parsed; if only the time changed (a
rename, a new description), the record's other kept fields are asked for without the
manifest; only a new portable data hash fetches and parses the whole record. With
`fedmount.fs.rechecks`, the freshness fields of many mounted collections of one cluster
come in one list request, and a collection found unchanged there asks nothing of its own.

A failure of the API becomes `FsError` with the errno of `fs/errors.py`, logged in one
line naming the collection and the cluster (a missing collection at info level, the rest
as errors); a malformed manifest is EIO. A `quiet` load (``--collection`` at start-up,
whose failure the command prints) logs nothing.

What a mounted collection keeps of its record is a `KeptRecord`: the parsed tree serves
the files and only ``.arvados#collection`` reads the record as it came, so the record is
kept zlib-compressed (level 1): its manifest text, the bulk of it, and apart from it the
other fields, which may be large too (a description, properties), since a re-check may
replace them alone. Parsing and packing run in a worker thread, and every load ends with
`fedmount.memory.release`, once the answer and the parse's temporaries are garbage, so
that the C heap's free memory goes back to the system.
"""

from __future__ import annotations

import errno
import json
import logging
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from fedmount.arvados.errors import ApiError
from fedmount.arvados.ids import CollectionId
from fedmount.arvados.manifest import Manifest, ManifestError, parse_manifest
from fedmount.arvados.routes import KeepRoute
from fedmount.memory import release
from fedmount.stats import Stats

from .context import CollectionRecordLike, CollectionSummaryLike, FederationLike
from .errors import FsError, api_failure
from .rechecks import Rechecks, TrackedLike

log = logging.getLogger("fedmount.fs")
T = TypeVar("T")

_ALWAYS_SELECTED = frozenset({"kind", "etag", "writable_by"})  # in every answer with `select`
FRESHNESS_FIELDS = ("modified_at", "portable_data_hash", "uuid")  # what a re-check asks first


def api_group(cid: CollectionId) -> str:
    """Whose stall an API call about `cid` waits on (`Calls`): a UUID's owning cluster; one
    group for every PDH, which may be on any cluster."""
    return cid.cluster or "pdh"


@dataclass(frozen=True, slots=True)
class KeptRecord:
    """What a mounted collection keeps of its API record (see the module docstring)."""

    uuid: str
    portable_data_hash: str
    modified_at: float | None
    cluster: str
    route: KeepRoute
    field_names: tuple[str, ...]  # of the API's answer, without manifest_text
    packed_fields: bytes  # zlib of those fields as JSON
    packed_manifest: bytes | None  # zlib of that manifest_text; None if the answer had none

    @classmethod
    def of(cls, summary: CollectionSummaryLike, packed_manifest: bytes | None) -> KeptRecord:
        """`summary` packed (CPU-heavy for a large record: run it in a worker thread)."""
        fields = {k: v for k, v in summary.answer.items() if k != "manifest_text"}
        return cls(
            summary.uuid,
            summary.portable_data_hash,
            summary.modified_at,
            summary.cluster,
            summary.route,
            tuple(fields),
            zlib.compress(json.dumps(fields).encode(), 1),
            packed_manifest,
        )

    def summary_fields(self) -> list[str]:
        """What a re-check selects when the record changed but not its PDH: every field of
        this record but its manifest text (so ``.arvados#collection`` stays as fresh), less
        those the API adds anyway."""
        return sorted({"uuid", "portable_data_hash", *self.field_names} - _ALWAYS_SELECTED)

    def answer(self) -> dict[str, Any]:
        """The API's answer as it came (with the manifest text of the parsed generation)."""
        fields: dict[str, Any] = json.loads(zlib.decompress(self.packed_fields))
        if self.packed_manifest is not None:
            fields["manifest_text"] = zlib.decompress(self.packed_manifest).decode()
        return fields


def _parse_and_pack(record: CollectionRecordLike) -> tuple[KeptRecord, Manifest]:
    """Parse a record's manifest and pack the record (run in a worker thread)."""
    manifest = parse_manifest(record.manifest_text)
    answered = record.answer.get("manifest_text")
    packed = zlib.compress(answered.encode(), 1) if isinstance(answered, str) else None
    return KeptRecord.of(record, packed), manifest


class CollectionLoader:
    """Loads and re-checks collections through the federation (see the module docstring).
    With `rechecks`, a re-check first asks it whether the collection is unchanged
    (`fedmount.fs.rechecks`: many collections of a cluster in one request)."""

    def __init__(self, federation: FederationLike, stats: Stats, rechecks: Rechecks | None = None):
        self.federation = federation
        self.stats = stats
        self.rechecks = rechecks

    def track(self, coll: TrackedLike) -> None:
        """A UUID collection was mounted: re-check it with the others of its cluster."""
        if self.rechecks is not None:
            self.rechecks.track(coll)

    async def load(self, cid: CollectionId, *, quiet: bool = False) -> tuple[KeptRecord, Manifest]:
        """The record and parsed manifest of `cid`, or FsError (logged in one line unless `quiet`)."""
        record, manifest = await self.recheck(cid, None, quiet=quiet)
        assert manifest is not None
        return record, manifest

    async def recheck(
        self, cid: CollectionId, known: KeptRecord | None, *, quiet: bool = False
    ) -> tuple[KeptRecord, Manifest | None]:
        """As `load`, but given `known` (the current record of a UUID collection) it first
        asks only for `FRESHNESS_FIELDS`. If the portable data hash and modification time are
        `known`'s, it gives (`known`, None); if only the time changed, the record's other
        kept fields, still without the manifest text (with `known`'s manifest text, None);
        only a new portable data hash fetches and parses the whole record."""
        try:
            return await self._recheck(cid, known, quiet)
        finally:
            release()

    async def _recheck(
        self, cid: CollectionId, known: KeptRecord | None, quiet: bool
    ) -> tuple[KeptRecord, Manifest | None]:
        federation = self.federation
        if known is not None:
            if self.rechecks is not None and await self._ask(cid, self.rechecks.unchanged(cid, known), quiet):
                return known, None
            summary = await self._ask(cid, federation.get_summary(cid, FRESHNESS_FIELDS), quiet)
            if summary.portable_data_hash == known.portable_data_hash:
                if summary.modified_at == known.modified_at:
                    return known, None
                # Only the record's other fields changed: ask for them, still without the manifest.
                summary = await self._ask(cid, federation.get_summary(cid, known.summary_fields()), quiet)
                if summary.portable_data_hash == known.portable_data_hash:
                    kept = await trio.to_thread.run_sync(KeptRecord.of, summary, known.packed_manifest)
                    return kept, None
        record = await self._ask(cid, federation.get_collection(cid), quiet)
        try:
            kept, manifest = await trio.to_thread.run_sync(_parse_and_pack, record)
        except ManifestError as e:
            message = f"collection {cid} (cluster {record.cluster}): {e}"
            self.stats.add("manifest_errors", cluster=record.cluster)
            if not quiet:
                log.error("%s", message)
            raise FsError(errno.EIO, message) from None
        self.stats.add("collections_loaded", cluster=record.cluster)
        return kept, manifest

    async def _ask(self, cid: CollectionId, answer: Awaitable[T], quiet: bool) -> T:
        """The federation's `answer` about `cid`; its `ApiError` as FsError, logged in one line."""
        try:
            return await answer
        except ApiError as e:
            raise api_failure(e, f"collection {cid}", self.stats, quiet=quiet) from None
