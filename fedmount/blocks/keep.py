"""Keep client: fetch one block from a route's keep services, md5-verified, with failover.

A `KeepRoute` names the cluster whose keep services serve a collection's blocks and the
exact token text to send them (home token in home mode, even for ``+R`` locators, which
the home keepstore proxies; the token salted for the owner in direct mode). Locators go
out unchanged, with every hint they carry.

Algorithm of `KeepClient.get`:

1. Probe order. Services are sorted by rendezvous weight, ``md5hex(hash + uuid[-15:])``
   descending (Arvados ``keep.py weighted_service_roots``), so every client asks the same
   replica first. Services that failed at the network level in the last
   ``demote_seconds`` move to the end of the list: a dead keepstore costs one connect
   timeout per host, not one per block.
2. One round tries each still-eligible service in that order. Per attempt the outcome is
   - 200 and md5(body) == hash: done. The bytes were hashed while they arrived, by the
     process's `MultiHasher` (md5.py), which hashes the chunks of every block arriving at
     once in the SIMD lanes of one core, so blocks fetched in parallel are verified in
     parallel; no byte leaves this module before the digest matched;
   - 200 with other bytes (or a wrong length): the service is dropped for this block,
     one warning line names it, and ``keep_bad_md5`` counts it; never returned;
   - 403/404/410: "not here", dropped for this block;
   - 408, 409, 423, 429, any 5xx, connect failure, reset, stall (no byte for
     ``timeouts.stall`` seconds), slow (under ``timeouts.min_rate`` bytes/s over
     ``timeouts.rate_window`` seconds, transport.py): transient, the service stays eligible
     for the next round. A stalled or slow service is named in one warning line;
   - any other status (400 bad signature, 401 expired token, ...): dropped for this block.
   A GET that has received no body byte within the hedge delay gets a second request to
   the next service of the round, the first verified answer wins and the other is aborted
   (hedge.py, ``--keep-hedge-after``); a loser that had sent nothing is demoted as a
   stalled service is.
3. Rounds repeat, after a jittered exponential backoff, while some service is still
   eligible, at most ``retries + 1`` rounds.
4. If every service said "not here" the result is `BlockNotFound`; otherwise `BlockError`.
   Both carry a one-line message with the block's ``hash+size`` (never its signature, never
   a token), the cluster and what each service answered.

Auto route (``route.remotes``, api/route_choice.py): a ``+R<cluster>`` block is first read
from that cluster's own keep services, if the choice gives their route, as
`direct_locator` (one round: the home is the retry); if that fails the choice is told and
the block is read along the home route as it is.

`head` locates a block the same way without a body: True on a 200, False if every
service said "not here", `BlockError` if none could answer.

Stats (labels ``cluster``): ``keep_requests``, ``keep_bytes``, ``keep_errors``,
``keep_seconds``, ``keep_bad_md5`` (labels cluster and service), and hedge.py's
``keep_hedges`` and ``keep_hedge_wins``. `KeepClient.meter` keeps
the bytes received and the seconds spent per cluster, summed over requests, for the
throughput book (throughput.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from fedmount.arvados.errors import BlockError, BlockNotFound
from fedmount.arvados.ids import Locator
from fedmount.arvados.retry import backoff_delay, new_request_id
from fedmount.arvados.routes import KeepRoute, KeepService, RemoteRoutes, direct_locator
from fedmount.stats import Stats

from .hedge import Contender, Hedging
from .md5 import MultiHasher, resolve_kernel
from .throughput import TransferMeter
from .transport import BlockTransport, Response, Timeouts, TransportError, Urllib3Transport

log = logging.getLogger("fedmount.keep")

NOT_HERE = frozenset({403, 404, 410})
TRANSIENT_4XX = frozenset({408, 409, 423, 429})
Body = bytearray | memoryview


def _transient(status: int) -> bool:
    return status >= 500 or status in TRANSIENT_4XX


def probe_order(block_hash: str, services: Sequence[KeepService]) -> list[KeepService]:
    """Services in rendezvous order: md5hex(hash + last 15 chars of uuid), descending."""
    return sorted(
        services, key=lambda s: hashlib.md5((block_hash + s.uuid[-15:]).encode()).hexdigest(), reverse=True
    )


@dataclass
class _Attempt:
    service: KeepService
    outcome: str  # what happened, for the error message
    done: bool  # True: do not ask this service again for this block
    not_here: bool = False


class KeepClient:
    def __init__(
        self,
        transport: BlockTransport | None = None,
        *,
        stats: Stats | None = None,
        timeouts: Timeouts | None = None,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 4.0,
        demote_seconds: float = 30.0,
        hasher: MultiHasher | None = None,
        hedge_after: float | None = None,
    ):
        self._transport = transport if transport is not None else Urllib3Transport()
        self._stats = stats if stats is not None else Stats()
        self._timeouts = timeouts if timeouts is not None else Timeouts()
        self.hedging = Hedging(hedge_after, self._timeouts.stall, self._stats)  # None: auto, 0: off
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._demote_seconds = demote_seconds
        self._demoted: dict[str, float] = {}  # service uuid -> monotonic time the demotion ends
        self._hasher = hasher if hasher is not None else shared_hasher()
        self.meter = TransferMeter()  # bytes received and seconds spent per cluster, per request

    def _order(self, locator: Locator, route: KeepRoute) -> list[KeepService]:
        now = time.monotonic()
        ordered = probe_order(locator.hash, route.services)
        return sorted(ordered, key=lambda s: self._demoted.get(s.uuid, 0.0) > now)  # stable sort

    async def get(
        self, locator: Locator, route: KeepRoute, into: memoryview | None = None
    ) -> bytes | bytearray | memoryview:
        """The block's bytes, verified against its md5; raises BlockNotFound or BlockError.

        `into`, a writable buffer of the block's size, receives the bytes (and is returned)
        instead of a new buffer; after a failure its content is undefined. The empty block
        is b"" without a request."""
        if locator.is_empty:
            return b""
        remote = locator.remote
        if route.remotes is not None and remote is not None:
            direct = await self._get_direct(direct_locator(locator), remote[0], route.remotes, into)
            if direct is not None:
                return direct
        body = await self._run(locator, route, "GET", into)
        assert body is not None
        return body

    async def _get_direct(
        self, locator: Locator, cluster: str, remotes: RemoteRoutes, into: memoryview | None
    ) -> Body | None:
        """Auto route: the block from `cluster`'s own keep services, or None to read it via the home."""
        route = await remotes.direct(cluster)
        if route is None:
            return None
        try:
            return await self._run(locator, route, "GET", into, rounds=1)
        except BlockError as e:
            remotes.failed(cluster, str(e))
            return None

    async def head(self, locator: Locator, route: KeepRoute) -> bool:
        """True if some service of the route has the block, False if every service said no."""
        try:
            await self._run(locator, route, "HEAD")
        except BlockNotFound:
            return False
        return True

    async def _run(
        self, locator: Locator, route: KeepRoute, method: str, into: memoryview | None = None, *,
        rounds: int | None = None,
    ) -> Body | None:
        if not route.services:
            raise BlockError(locator, f"block {locator.key}: cluster {route.cluster} lists no keep services")
        headers = {
            "Authorization": f"Bearer {route.token}",
            "Accept": "application/octet-stream",
            "X-Request-Id": new_request_id(),
        }
        eligible = self._order(locator, route)
        last: dict[str, _Attempt] = {}
        attempt = functools.partial(self._attempt, locator, route, method, headers)
        for round_no in range(self._retries + 1 if rounds is None else rounds):
            if round_no:
                await trio.sleep(backoff_delay(round_no - 1, self._backoff, self._max_backoff))
            outcome = await self.hedging.race(route.cluster, eligible, into, attempt, hedge=method == "GET")
            if outcome.won:
                return outcome.body
            for failed in outcome.failures:
                last[failed.service.uuid] = failed
                if failed.done:
                    eligible.remove(failed.service)
            if not eligible:
                break
        tried = "; ".join(f"{a.service.root_url} {a.outcome}" for a in last.values())
        if all(a.not_here for a in last.values()):
            raise BlockNotFound(
                locator, f"block {locator.key} not found on cluster {route.cluster} ({tried})"
            )
        raise BlockError(
            locator,
            f"block {locator.key} unreadable from cluster {route.cluster}: {tried}; check those services",
        )

    async def _attempt(
        self,
        locator: Locator,
        route: KeepRoute,
        method: str,
        headers: dict[str, str],
        service: KeepService,
        contender: Contender[KeepService],
    ) -> tuple[Body | None, _Attempt | None]:
        """One request to one service, received into `contender.into`, stopped by its `abort`:
        (body, None) on success, else (None, what went wrong)."""
        url = service.root_url.rstrip("/") + "/" + str(locator)
        stats, cluster, into = self._stats, route.cluster, contender.into
        started = time.monotonic()
        stats.add("keep_requests", cluster=cluster)
        try:
            resp, digest = await trio.to_thread.run_sync(
                self._fetch, method, url, headers, locator.size, contender
            )
        except TransportError as exc:
            if contender.abort.aborted:  # lost a race, or cancelled; demoted if it lost sending nothing
                if contender.stalled:
                    self._demoted[service.uuid] = time.monotonic() + self._demote_seconds
                return None, _Attempt(service, "aborted", done=False)
            stats.add("keep_errors", cluster=cluster)
            self._demoted[service.uuid] = time.monotonic() + self._demote_seconds
            if exc.kind in ("stall", "slow"):
                log.warning("keep service %s (%s) abandoned for block %s: %s; trying the next replica",
                            service.uuid, service.root_url, locator.key, exc)  # fmt: skip
            return None, _Attempt(service, f"{exc.kind}: {exc}", done=exc.kind == "length")
        finally:
            elapsed = time.monotonic() - started
            stats.add("keep_seconds", elapsed, cluster=cluster)
            self.meter.add(cluster, seconds=elapsed)
        self._demoted.pop(service.uuid, None)
        if resp.status == 200 and method == "HEAD":
            return None, None
        if resp.status == 200 and resp.body is not None:
            stats.add("keep_bytes", len(resp.body), cluster=cluster)
            self.meter.add(cluster, nbytes=len(resp.body))
            if digest == locator.hash:
                if into is not None and resp.body is not into:  # a transport that ignored `into`
                    into[:] = resp.body
                    return into, None
                return resp.body, None
            stats.add("keep_bad_md5", cluster=cluster, service=service.uuid)
            log.warning(
                "keep service %s (%s) served bad bytes for block %s (md5 %s); trying the next replica",
                service.uuid,
                service.root_url,
                locator.key,
                digest,
            )
            return None, _Attempt(service, f"bad md5 {digest}", done=True)
        stats.add("keep_errors", cluster=cluster)
        return None, _Attempt(
            service, f"HTTP {resp.status}", done=not _transient(resp.status), not_here=resp.status in NOT_HERE
        )

    def _fetch(
        self, method: str, url: str, headers: dict[str, str], size: int, contender: Contender[KeepService],
    ) -> tuple[Response, str]:
        """Worker thread: one request, the body's md5 hashed (in the hasher's lanes, together with
        the other blocks arriving) while it arrives; the digest is "" without a 200 body."""
        with contender.abort.installed():
            if method != "GET":
                return self._transport(method, url, headers, size, self._timeouts, _ignore, into=None), ""
            stream = self._hasher.stream()

            def sink(chunk: memoryview) -> None:
                contender.received()
                stream(chunk)

            try:
                resp = self._transport(
                    method, url, headers, size, self._timeouts, sink, into=contender.into
                )
            except BaseException:
                stream.close()  # before `into` is received into again (the next replica)
                raise
        if resp.status != 200 or resp.body is None:
            stream.close()
            return resp, ""
        return resp, stream.hexdigest()


def _ignore(chunk: memoryview) -> None:
    """The sink of a request without a body to hash."""


@functools.cache
def shared_hasher() -> MultiHasher:
    """The process's multi-buffer md5 (md5.py): every KeepClient's GETs share its lanes (with
    hashlib, without the native kernels: a thread per core)."""
    kernel = resolve_kernel()
    return MultiHasher(kernel=kernel, threads=1 if kernel != "hashlib" else max(1, os.cpu_count() or 1))
