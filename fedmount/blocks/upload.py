"""Keep writes: files packed into blocks, each block PUT with its copies and storage classes.

What a ``--mount-tmp`` directory holds becomes a collection the way arv-put and the SDK's
``Collection`` make one (``sdk/python/arvados/keep.py`` ``KeepClient.put``,
``arvfile.py`` ``_BlockManager``), so that crunch-run can save its manifest as a
container's output:

Packing (`plan_blocks`)
    The files, in manifest order (`fedmount.arvados.manifest_writer`: a directory's files
    by name, then its subdirectories), are one byte sequence cut into blocks of at most
    64 MiB. A file may span blocks and a block may hold the ends of many small files, of
    several directories. The plan depends only on the sizes.

One block (`KeepWriter.put`)
    ``PUT /<md5>`` with ``Content-Length``, ``X-Keep-Desired-Replicas`` (the copies still
    wanted) and, while some wanted class is not yet confirmed ``copies`` times,
    ``X-Keep-Storage-Classes`` naming those classes (sorted, ``", "``). The writable
    services of the home cluster are tried in rendezvous order (the read path's
    `probe_order`), as many at once as copies are still missing when they are all
    keepstores (the SDK's writer threads do the same), one at a time otherwise; a 200 adds
    its ``X-Keep-Replicas-Stored`` (1 if absent) and its ``X-Keep-Storage-Classes-Confirmed``
    (``class=n, ...``) and that service is done for this block. A service whose answer
    carries no confirmation turns class tracking off, as in the SDK: copies alone decide.
    4xx other than 408/409/423/429 (a bad signature, 413, 507 "insufficient storage" for a
    class the volume lacks) is final for that service; 5xx, those four and network failures
    are retried in the next round, after a jittered backoff, up to ``retries + 1`` rounds.
    Done when ``copies`` replicas are stored and every wanted class is confirmed ``copies``
    times; otherwise `KeepWriteError`, one line naming the block (``hash+size``, never a
    signature or a token), what was wanted, what was stored and what each service
    answered. The answer's body is the signed locator the manifest carries.

Many blocks (`upload`)
    At most ``parallel`` blocks are in flight at once (each is read into memory, hashed in
    a worker thread, then PUT); the first failure cancels the others and is raised. A
    block already stored by an earlier upload of this process (same ``hash+size``) whose
    signature has more than half of its life left is not sent again: reading a
    ``.arvados#collection`` twice, or after a failed attempt, sends only what is new.

Stats (label ``cluster``): ``keep_puts`` (blocks, as arv-mount's ``keepcalls put``),
``keep_put_requests``, ``keep_put_bytes`` (body bytes sent, every replica counted, as its
``net:keep0 tx``), ``keep_put_errors``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio
import urllib3

from fedmount.arvados.errors import KeepWriteError
from fedmount.arvados.ids import MAX_BLOCK_SIZE, parse_locator
from fedmount.arvados.manifest_writer import DirEntry, FileEntry, Piece, manifest_text
from fedmount.arvados.retry import backoff_delay, new_request_id
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.stats import Stats

from .keep import TRANSIENT_4XX, probe_order

log = logging.getLogger("fedmount.upload")

DEFAULT_PARALLEL = 3  # blocks in flight: 3 x 64 MiB of memory at most


@dataclass
class PutResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class PutError(Exception):
    """No HTTP answer (connect failure, reset, timeout)."""


class PutTransport(Protocol):
    def __call__(self, url: str, headers: Mapping[str, str], body: memoryview, timeout: float) -> PutResponse:
        """Blocking: one PUT; `PutError` when no HTTP answer came."""
        ...


class Urllib3Put:
    """The production transport: a pooled urllib3 client."""

    def __init__(self, *, ca_file: str | None = None, insecure: bool = False):
        self._pool = urllib3.PoolManager(
            num_pools=16, maxsize=DEFAULT_PARALLEL, retries=False,
            cert_reqs="CERT_NONE" if insecure else "CERT_REQUIRED", ca_certs=ca_file,
        )  # fmt: skip

    def __call__(self, url: str, headers: Mapping[str, str], body: memoryview, timeout: float) -> PutResponse:
        try:
            resp = self._pool.request("PUT", url, body=body, headers=dict(headers), redirect=False,
                                      timeout=urllib3.Timeout(connect=5.0, read=timeout))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise PutError(" ".join(str(exc).split()) or type(exc).__name__) from exc
        return PutResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.data)


def _confirmed(header: str | None) -> dict[str, int] | None:
    """``X-Keep-Storage-Classes-Confirmed`` as {class: copies}; None if absent or malformed."""
    if header is None:
        return None
    out: dict[str, int] = {}
    try:
        for item in header.split(","):
            name, _, copies = item.strip().partition("=")
            if name:
                out[name] = out.get(name, 0) + int(copies)
    except ValueError:
        return None
    return out


@dataclass
class _Tally:
    copies: int
    classes: list[str]
    stored: int = 0
    confirmed: dict[str, int] = field(default_factory=dict)
    tracking: bool = True

    def pending_classes(self) -> list[str]:
        if not self.tracking:
            return []
        return sorted(c for c in self.classes if self.confirmed.get(c, 0) < self.copies)

    def done(self) -> bool:
        return self.stored >= self.copies and not self.pending_classes()

    def add(self, replicas: int, confirmed: dict[str, int] | None) -> None:
        self.stored += replicas
        if confirmed is None:
            self.tracking = False
        for name, n in (confirmed or {}).items():
            self.confirmed[name] = self.confirmed.get(name, 0) + n


class KeepWriter:
    """Stores blocks on one route's writable keep services (see the module docstring)."""

    def __init__(self, route: KeepRoute, transport: PutTransport, *, copies: int = 2,
                 classes: Sequence[str] = (), stats: Stats | None = None, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 8.0, timeout: float = 300.0):
        self.route = route
        self.copies = max(copies, 1)
        self.classes = [c for c in classes if c]
        self._transport = transport
        self._stats = stats if stats is not None else Stats()
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._timeout = timeout

    @property
    def _all_disk(self) -> bool:
        """Whether each service stores one copy (keepstores), so copies may go out at once; a
        keepproxy stores as many as it is asked for, one request at a time (as the SDK does)."""
        return all(s.service_type == "disk" for s in self.route.services)

    def _writable(self, block_hash: str) -> list[KeepService]:
        return [s for s in probe_order(block_hash, self.route.services) if not s.read_only]

    async def put(self, data: bytes | bytearray | memoryview, block_hash: str | None = None) -> str:
        """The signed locator of `data` once stored as asked; `KeepWriteError` otherwise."""
        view = memoryview(data)
        if block_hash is None:
            block_hash = await trio.to_thread.run_sync(lambda: hashlib.md5(view).hexdigest())
        key = f"{block_hash}+{len(view)}"
        cluster = self.route.cluster
        self._stats.add("keep_puts", cluster=cluster)
        tally = _Tally(self.copies, self.classes)
        pending = self._writable(block_hash)
        outcomes: dict[str, str] = {}
        signed: list[str] = []
        if not pending:
            raise KeepWriteError(key, f"block {key}: cluster {cluster} lists no writable keep service")

        async def attempt(service: KeepService) -> None:
            answer, final, locator = await self._attempt(service, key, view, tally)
            outcomes[service.root_url] = answer
            if locator:
                signed.append(locator)
            if final:
                pending.remove(service)

        for round_no in range(self._retries + 1):
            if round_no:
                await trio.sleep(backoff_delay(round_no - 1, self._backoff, self._max_backoff))
            queue = list(pending)
            while queue and not tally.done():
                missing = max(tally.copies - tally.stored, 1) if self._all_disk else 1
                batch, queue = queue[:missing], queue[missing:]
                async with trio.open_nursery() as nursery:
                    for service in batch:
                        nursery.start_soon(attempt, service)
            if tally.done() or not pending:
                break
        if tally.done():
            return signed[-1]
        wanted = f"{self.copies} cop{'y' if self.copies == 1 else 'ies'}"
        if self.classes:
            wanted += f" in class{'es' if len(self.classes) > 1 else ''} {','.join(self.classes)}"
        tried = "; ".join(f"{url} {what}" for url, what in outcomes.items())
        raise KeepWriteError(key, f"block {key} to cluster {cluster}: wanted {wanted}, "
                                  f"stored {tally.stored} ({tried})")

    async def _attempt(self, service: KeepService, key: str, view: memoryview,
                       tally: _Tally) -> tuple[str, bool, str | None]:
        """One PUT: what happened, whether this service is done for this block, and the
        signed locator it answered (None unless it stored the block)."""
        headers = {
            "Authorization": f"Bearer {self.route.token}",
            "Content-Length": str(len(view)),
            "X-Request-Id": new_request_id(),
            "X-Keep-Desired-Replicas": str(max(tally.copies - tally.stored, 1)),
        }
        classes = tally.pending_classes()
        if classes:
            headers["X-Keep-Storage-Classes"] = ", ".join(classes)
        url = service.root_url.rstrip("/") + "/" + key.split("+")[0]
        stats, cluster = self._stats, self.route.cluster
        stats.add("keep_put_requests", cluster=cluster)
        try:
            resp = await trio.to_thread.run_sync(self._transport, url, headers, view, self._timeout)
        except PutError as e:
            stats.add("keep_put_errors", cluster=cluster)
            return f"failed: {e}", False, None
        stats.add("keep_put_bytes", len(view), cluster=cluster)
        if resp.status != 200:
            stats.add("keep_put_errors", cluster=cluster)
            transient = resp.status >= 500 or resp.status in TRANSIENT_4XX
            reason = resp.body.decode(errors="replace").strip().splitlines()[:1]
            detail = f" {reason[0][:120]}" if reason else ""
            return f"HTTP {resp.status}{detail}", not transient, None
        body = resp.body.decode(errors="replace").strip()
        try:
            locator = parse_locator(body)
        except ValueError:
            stats.add("keep_put_errors", cluster=cluster)
            return "answered no locator", True, None
        if locator.key != key:
            stats.add("keep_put_errors", cluster=cluster)
            return f"answered the locator of another block ({locator.key})", True, None
        try:
            replicas = int(resp.headers.get("x-keep-replicas-stored", "1"))
        except ValueError:
            replicas = 1
        tally.add(replicas, _confirmed(resp.headers.get("x-keep-storage-classes-confirmed")))
        return f"stored {replicas}", True, body


# -- packing ---------------------------------------------------------------------------------


Reader = Callable[[int, int], bytes]  # (offset, size) -> bytes; blocking (a pread)


@dataclass
class SourceFile:
    name: str
    size: int
    read: Reader


@dataclass
class SourceDir:
    files: list[SourceFile] = field(default_factory=list)
    dirs: dict[str, SourceDir] = field(default_factory=dict)

    def size(self) -> int:
        return sum(f.size for f in self.files) + sum(d.size() for d in self.dirs.values())


def _in_manifest_order(root: SourceDir) -> list[SourceFile]:
    out: list[SourceFile] = []

    def walk(d: SourceDir) -> None:
        out.extend(sorted(d.files, key=lambda f: f.name))
        for name in sorted(d.dirs):
            walk(d.dirs[name])

    walk(root)
    return out


def plan_blocks(
    sizes: Sequence[int], block_size: int = MAX_BLOCK_SIZE
) -> tuple[list[list[Piece]], list[int]]:
    """Each file's pieces and each block's size, for files of `sizes` in that order."""
    pieces: list[list[Piece]] = []
    blocks: list[int] = []
    used = block_size  # the current block is full: the first byte opens a new one
    for size in sizes:
        mine: list[Piece] = []
        left = size
        while left:
            if used == block_size:
                blocks.append(0)
                used = 0
            n = min(left, block_size - used)
            mine.append(Piece(len(blocks) - 1, used, n))
            used += n
            blocks[-1] = used
            left -= n
        pieces.append(mine)
    return pieces, blocks


@dataclass
class _Stored:
    locator: str
    reuse_until: float


class Uploader:
    """Turns a `SourceDir` into a manifest whose blocks are in Keep (see the module docstring)."""

    def __init__(self, writer: KeepWriter, *, parallel: int = DEFAULT_PARALLEL,
                 block_size: int = MAX_BLOCK_SIZE, wall: Callable[[], float] = time.time):
        self.writer = writer
        self._parallel = parallel
        self._block_size = block_size
        self._wall = wall
        self._stored: dict[str, _Stored] = {}

    async def upload(self, root: SourceDir) -> str:
        """The signed manifest text of `root`; `KeepWriteError` (or OSError from a read)."""
        files = _in_manifest_order(root)
        pieces, sizes = plan_blocks([f.size for f in files], self._block_size)
        sources: list[list[tuple[SourceFile, Piece, int]]] = [[] for _ in sizes]
        for f, mine in zip(files, pieces, strict=True):
            at = 0
            for p in mine:
                sources[p.block].append((f, p, at))
                at += p.length
        locators = [""] * len(sizes)
        limit = trio.Semaphore(self._parallel)

        async def one(i: int) -> None:
            async with limit:
                data, digest = await trio.to_thread.run_sync(_assemble, sources[i], sizes[i])
                key = f"{digest}+{sizes[i]}"
                known = self._stored.get(key)
                if known is not None and self._wall() < known.reuse_until:
                    locators[i] = known.locator
                    return
                locators[i] = await self.writer.put(data, digest)
                self._remember(key, locators[i])

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(sizes)):
                    nursery.start_soon(one, i)
        except BaseExceptionGroup as group:  # the first block that failed says why
            raise _first_failure(group) from None
        entries = {id(f): FileEntry(f.name, mine) for f, mine in zip(files, pieces, strict=True)}
        return manifest_text(_entries(root, entries), locators, sizes)

    def _remember(self, key: str, locator: str) -> None:
        now = self._wall()
        expiry = parse_locator(locator).signature_expiry
        if expiry is not None and expiry > now:
            self._stored[key] = _Stored(locator, now + (expiry - now) / 2)


def _first_failure(group: BaseExceptionGroup) -> BaseException:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_failure(e)
        if not isinstance(e, trio.Cancelled):
            return e
    return group


def _assemble(parts: list[tuple[SourceFile, Piece, int]], size: int) -> tuple[bytearray, str]:
    """Worker thread: a block's bytes from its files, and their md5."""
    data = bytearray(size)
    for f, p, at in parts:
        chunk = f.read(at, p.length)
        if len(chunk) != p.length:
            raise OSError(f"{f.name} changed while it was being uploaded")
        data[p.offset : p.offset + p.length] = chunk
    return data, hashlib.md5(data).hexdigest()


def _entries(d: SourceDir, files: dict[int, FileEntry]) -> DirEntry:
    return DirEntry([files[id(f)] for f in d.files], {n: _entries(s, files) for n, s in d.dirs.items()})
