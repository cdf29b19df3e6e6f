"""``fedmount stage --to-cluster X``: make every block of some collections present in cluster
X's own Keep, so that every host of X reads them without crossing clusters.

The primitive is keepstore's (``services/keepstore`` ``blockReadRemote`` with a local
locator; the Python SDK's ``KeepClient.refresh_signature``): asked for a ``+R<cluster>-``
locator with ``X-Keep-Signature: local, <time>``, a keepstore reads the block whole from
the cluster that signed it, stores it on its own volume and answers with
``X-Keep-Locator``, the block's locator signed by X for the caller. The request is a HEAD,
as the SDK sends it: the bytes go from the remote cluster to X's keepstore and never to
this host.

Algorithm of `stage_to_cluster` (X must be the home cluster: a ``+R`` locator is signed for
the caller's token salted for the owning cluster, which only the home keepstore derives
from the token it is given; another cluster's keepstore would present a token salted for
itself, which the owner refuses):

1. Resolve every ID in home mode (`stage.resolve_blocks`, as ``fedmount stage`` does): the
   home route and each block's locator, ``+R`` for a block of another cluster.
2. Per distinct block, ``concurrency`` at once, with a progress line: a block whose local
   locator an earlier run recorded (`CopyRecord`) is asked for with a plain HEAD: still
   there, it counts as already present and nothing is copied. A ``+A`` locator (signed by
   X itself) is checked the same way. Anything else is copied: the HEAD with
   ``X-Keep-Signature: local``, in the route's probe order until a keepstore answers.
3. The outcome per block is a `stage_report.Outcome` (``cached``: already in X's Keep,
   ``fetched``: copied now, ``failed``: with the keepstore's one-line reason), so the report
   is a `StageReport` for target X. Copies are recorded as they complete: an interrupted
   run, re-run, copies only what is left.

With ``--save-as NAME`` (`save_collection`), once every block of a collection is in X's
Keep, a new collection NAME is created on X whose manifest is the original with each
locator replaced by X's own (``+R`` -> ``+A``, the conversion the federation roadmap asks
for): the same PDH, readable by every host of X from X's Keep alone, and what
``fedmount locate --cluster X`` then finds there.

`CopyRecord` keeps ``(cluster, hash+size) -> local locator`` in a `diskcache.Cache` in the
cache directory, each entry expiring with its signature and the store bounded
(least-recently-stored entries go first): the small persistent key-value store with
expiry and eviction that this needs, without a schema of fedmount's own.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import diskcache
import httpx
import trio

from fedmount.arvados.errors import BlockError
from fedmount.arvados.ids import IdError, Locator, parse_collection_id, parse_locator
from fedmount.arvados.retry import new_request_id
from fedmount.arvados.routes import KeepRoute
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import redact
from fedmount.blocks.keep import probe_order
from fedmount.records import private_record

from .progress import Progress
from .stage import resolve_blocks
from .stage_report import Outcome, StageReport
from .view import LocalityView, LookupFailure

RECORD_DIR = "cluster-copies"
RECORD_BYTES = 64 << 20  # bound of the copy record (a few hundred bytes per block)
EXPIRY_MARGIN = 3600  # a recorded locator this close to expiring is asked for anew


class CopyRecord:
    """Which blocks this host already had copied into which cluster's Keep (see module docstring)."""

    def __init__(self, directory: str | None):
        self._store: diskcache.Cache | dict[str, str] = (
            private_record(os.path.join(directory, RECORD_DIR), size_limit=RECORD_BYTES) if directory else {}
        )

    def get(self, cluster: str, key: str) -> Locator | None:
        text = self._store.get(f"{cluster}/{key}")
        try:
            return parse_locator(text) if isinstance(text, str) else None
        except IdError:
            return None

    def put(self, cluster: str, locator: Locator) -> None:
        expiry = locator.signature_expiry
        remaining = (expiry - time.time() - EXPIRY_MARGIN) if expiry else 0
        if remaining <= 0:
            return
        if isinstance(self._store, dict):
            self._store[f"{cluster}/{locator.key}"] = str(locator)
        else:
            self._store.set(f"{cluster}/{locator.key}", str(locator), expire=remaining)

    def close(self) -> None:
        if not isinstance(self._store, dict):
            self._store.close()


class ClusterKeep:
    """HEADs at a cluster's keepstores: is a block there, and copy one there (X-Keep-Signature)."""

    def __init__(self, settings: Settings | None = None, transport: httpx.AsyncBaseTransport | None = None):
        verify: ssl.SSLContext | bool = True
        if settings is not None and settings.insecure:
            verify = False
        elif settings is not None and settings.ca_file:
            verify = ssl.create_default_context(cafile=settings.ca_file)
        self._client = httpx.AsyncClient(transport=transport, verify=verify,
                                         timeout=httpx.Timeout(300.0, connect=10.0))  # fmt: skip

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _head(self, locator: Locator, route: KeepRoute, headers: dict[str, str]) -> httpx.Response:
        """HEAD at each service of the route in probe order until one says 200; the last answer."""
        last: httpx.Response | None = None
        problems = []
        for service in probe_order(locator.hash, route.services):
            url = service.root_url.rstrip("/") + "/" + str(locator)
            auth = {"Authorization": f"Bearer {route.token}"}
            try:
                last = await self._client.head(url, headers={**auth, **headers})
            except httpx.HTTPError as exc:
                problems.append(f"{service.root_url}: {type(exc).__name__}")
                continue
            if last.status_code == 200:
                return last
            problems.append(f"{service.root_url} HTTP {last.status_code}")
        if last is None:
            raise BlockError(locator, f"block {locator.key}: no keepstore of {route.cluster} answered "
                             f"({'; '.join(problems) or 'none listed'})")  # fmt: skip
        last.extensions["fedmount_problems"] = "; ".join(problems)
        return last

    async def has(self, locator: Locator, route: KeepRoute) -> bool:
        """A locator signed by the route's cluster: is the block in its Keep?"""
        return (await self._head(locator, route, {})).status_code == 200

    async def copy(self, locator: Locator, route: KeepRoute) -> Locator:
        """Have the route's cluster copy a ``+R`` block into its own Keep; its local locator."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        answer = await self._head(locator, route, {"X-Keep-Signature": f"local, {stamp}"})
        local = answer.headers.get("X-Keep-Locator")
        if answer.status_code != 200 or not local:
            why = answer.extensions.get("fedmount_problems") or f"HTTP {answer.status_code}"
            raise BlockError(locator, redact(f"block {locator.key}: {route.cluster} could not copy it "
                                             f"from {locator.remote[0] if locator.remote else '?'} ({why})"))
        try:
            return parse_locator(local.strip())
        except IdError:
            raise BlockError(locator, f"block {locator.key}: {route.cluster} answered a malformed "
                             "X-Keep-Locator") from None


_LOCATOR_RE = re.compile(r"^[0-9a-f]{32}\+[0-9]+(\+[A-Za-z][^+ ]*)*$")


def local_manifest(manifest_text: str, local: dict[str, Locator]) -> str:
    """`manifest_text` with every block locator replaced by `local[hash+size]` (kept if absent)."""
    def swap(token: str) -> str:
        if not _LOCATOR_RE.match(token):
            return token
        hash_, size = token.split("+", 2)[:2]
        found = local.get(f"{hash_}+{size}")
        return str(found) if found is not None else token

    return "".join(" ".join(swap(t) for t in line.split(" ")) + "\n" for line in manifest_text.splitlines())


async def save_collection(
    settings: Settings, name: str, manifest_text: str, transport: httpx.AsyncBaseTransport | None = None
) -> dict:
    """Create collection `name` on the home cluster (the only one the home token goes to): its record."""
    verify: ssl.SSLContext | bool = False if settings.insecure else (
        ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else True)  # fmt: skip
    async with httpx.AsyncClient(transport=transport, verify=verify, timeout=60.0) as client:
        answer = await client.post(
            f"https://{settings.api_host}/arvados/v1/collections",
            headers={"Authorization": f"Bearer {settings.token.text}", "X-Request-Id": new_request_id()},
            json={"collection": {"name": name, "manifest_text": manifest_text}},
        )
    if answer.status_code >= 300:
        raise LookupFailure(redact(f"--save-as {name}: the home cluster answered HTTP {answer.status_code}: "
                                   f"{answer.text.strip()[:200]}"))  # fmt: skip
    return answer.json()


async def save_staged(
    view: LocalityView, settings: Settings, report: StageReport, local: dict[str, Locator], name: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """--save-as: the one staged collection, with X's locators, as collection `name` on X."""
    [staged] = report.collections
    record = await view.resolve(parse_collection_id(staged.id))
    saved = await save_collection(settings, name, local_manifest(record.manifest_text, local), transport)
    report.saved = {"name": name, "uuid": saved.get("uuid"),
                    "portable_data_hash": saved.get("portable_data_hash")}  # fmt: skip


async def stage_to_cluster(
    ids: Sequence[str],
    view: LocalityView,
    cluster: str,
    keep: ClusterKeep,
    record: CopyRecord,
    *,
    concurrency: int = 4,
    progress_stream: TextIO | None = sys.stderr,
    local: dict[str, Locator] | None = None,
) -> StageReport:
    """Make every block of `ids` present in `cluster`'s Keep (see the module docstring); each
    block's locator signed by `cluster` goes into `local` (for `local_manifest`)."""
    local = {} if local is None else local
    if cluster != view.home_cluster or view.mode != "home":
        return StageReport([], False, target=cluster, error=(
            f"--to-cluster {cluster}: only the home cluster ({view.home_cluster}) can copy blocks into "
            "its Keep with this token (another cluster's keepstore would present a token salted for "
            f"itself, which the owning cluster refuses); `fedmount locate --cluster {cluster}` says "
            "what it already holds"))  # fmt: skip
    staged, plan = await resolve_blocks(ids, view, concurrency)
    report = StageReport(staged, False, target=cluster)
    total = sum(loc.size for loc, _ in plan.values())
    progress = Progress(total, len(plan), stream=progress_stream) if progress_stream is not None else None
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def one(loc: Locator, route: KeepRoute) -> None:
        async with limiter:
            try:
                outcome = await _make_present(loc, route, keep, record, local)
            except BlockError as exc:
                report.outcome[loc.key], report.failures[loc.key] = Outcome.FAILED, str(exc)
                if progress is not None:
                    progress.fail()
                return
        report.outcome[loc.key] = outcome
        if progress is not None and outcome is Outcome.CACHED:
            progress.skip(loc.size)
        elif progress is not None:
            progress.advance(loc.size)

    if progress is not None:
        progress.fetch_started()
    try:
        async with trio.open_nursery() as nursery:
            for loc, route in plan.values():
                nursery.start_soon(one, loc, route)
    finally:
        if progress is not None:
            progress.finish()
    return report


async def _make_present(
    loc: Locator, route: KeepRoute, keep: ClusterKeep, record: CopyRecord, local: dict[str, Locator]
) -> Outcome:
    if loc.is_empty:
        local[loc.key] = loc
        return Outcome.CACHED
    known = record.get(route.cluster, loc.key)
    if known is not None and await keep.has(known, route):
        local[loc.key] = known
        return Outcome.CACHED
    remote = loc.remote
    if loc.signature is not None or remote is None or remote[0] == route.cluster:
        if await keep.has(loc, route):  # signed by the cluster itself: its own block
            local[loc.key] = loc
            return Outcome.CACHED
        raise BlockError(loc, f"block {loc.key} is not in {route.cluster}'s Keep and no other cluster "
                         "signed it, so there is nowhere to copy it from")  # fmt: skip
    copied = await keep.copy(loc, route)
    record.put(route.cluster, copied)
    local[loc.key] = copied
    return Outcome.FETCHED
