"""Route a collection UUID or PDH to the cluster that holds it, home-proxied or direct.

`Federation.connect` reads the home cluster's discovery document (its cluster id,
``remoteHosts``, ``blobSignatureTtl``) and checks the token with ``users/current``, so a
wrong token or an unreachable home fails at mount time with one line.

Two modes (reference/arvados-protocol.md §2, §6 "What a client should do"):

- *home* (the default, what Arvados clients do): every lookup goes to the home
  controller, which proxies a remote UUID to its owner by prefix and fans a PDH out to
  every remote. Blocks are read from the home keep services with the home token; remote
  blocks carry ``+R<cluster>-<sig>`` hints and the home keepstore proxies them.
- *direct* (for a home whose keepstores cannot proxy): a UUID of cluster C is fetched from
  ``remoteHosts[C]`` with the token salted for C, and its blocks are read from C's own
  keep services with that salted token. A PDH is asked of the home first, then (if the
  home lacks it, or only has it through its own remote fan-out) of every remote
  concurrently; the first verified answer wins.

The home token never reaches another cluster, by construction: the only code that makes
a client for a cluster other than home is `_RemoteClients.get`, which builds it with
``salt_for(token, cluster)`` and refuses a token it cannot salt. `Federation.controller`
is the public way to talk to one cluster's API directly (e.g. `fedmount locate` asking
each cluster for its own copy): the home client for the home cluster, otherwise that
same salted remote client.

A PDH answer is trusted only if its manifest hashes to the PDH asked for; otherwise the
answer is rejected with an error naming the cluster (the controller treats this as a
502 from that remote, and so do we).

`Federation.get_summary` asks for a UUID's record without its manifest text (``select``),
routed as `get_collection` routes it; the home controller passes ``select`` on when it
forwards a remote UUID. It is what a mounted UUID collection's re-check asks for; there is
no summary of a PDH, since only its manifest can verify an answer.
"""

from __future__ import annotations

import re
from calendar import timegm
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from fedmount.blocks.keep import KeepRoute, KeepService
from fedmount.stats import Stats

from .controller import ApiError, ControllerClient
from .ids import CollectionId
from .manifest import portable_data_hash
from .settings import Settings
from .tokens import salt_for

Mode = Literal["home", "direct"]
DEFAULT_BLOB_SIGNATURE_TTL = 1209600
_TIMESTAMP_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$")


def parse_timestamp(text: str | None) -> float | None:
    """RFC 3339 (any number of fraction digits, ``Z`` or an offset) -> Unix time; else None."""
    m = _TIMESTAMP_RE.match(text or "")
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    value = timegm((year, month, day, hour, minute, second)) + float("0." + (m.group(7) or "0"))
    zone = m.group(8)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "+" else 1
        digits = zone[1:].replace(":", "")
        value += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return value


@dataclass
class CollectionSummary:
    """A collection's record as the API answered it, without its manifest text."""

    uuid: str  # the UUID, or the PDH when looked up by PDH
    portable_data_hash: str
    modified_at: float | None
    cluster: str  # the cluster that owns (UUID) or served (PDH) the collection
    record: dict[str, Any]  # the API's answer as it came
    route: KeepRoute  # where the blocks are read from, and with which token


@dataclass
class CollectionRecord(CollectionSummary):
    """A collection's whole record: the summary and its (signed) manifest text."""

    manifest_text: str


class _RemoteClients:
    """Controller clients of remote clusters, made on first use, each with a salted token."""

    def __init__(self, settings: Settings, home: str, discovery: dict[str, Any], **client_args: Any):
        self._token = settings.token
        self._home = home
        self._hosts: dict[str, str] = dict(discovery.get("remoteHosts") or {})
        self._via_dns = bool(discovery.get("remoteHostsViaDNS"))
        self._client_args = client_args
        self._clients: dict[str, ControllerClient] = {}

    def known(self) -> list[str]:
        return sorted(c for c in self._hosts if c != self._home)

    def get(self, cluster: str) -> ControllerClient:
        client = self._clients.get(cluster)
        if client is not None:
            return client
        if cluster == self._home:
            raise ValueError("the home cluster is not a remote")
        host = self._hosts.get(cluster) or (f"{cluster}.arvadosapi.com" if self._via_dns else None)
        if host is None:
            raise ApiError(404, cluster, f"cluster {cluster} is not a remote cluster of {self._home}")
        token = salt_for(self._token, cluster)
        if token == self._token and self._token.cluster != cluster:
            raise ApiError(
                400, cluster, f"cannot salt the token for {cluster} (it looks salted already); use home mode"
            )
        client = ControllerClient(host, token, cluster=cluster, **self._client_args)
        self._clients[cluster] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


class Federation:
    """The home cluster and, in direct mode, every remote it knows."""

    def __init__(self, settings: Settings, mode: Mode, home: ControllerClient, remotes: _RemoteClients):
        self.settings = settings
        self.mode = mode
        self.home = home
        self.home_cluster = home.cluster
        self._remotes = remotes
        self.blob_signature_ttl = DEFAULT_BLOB_SIGNATURE_TTL
        self.user: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        *,
        mode: Mode = "home",
        transport: httpx.AsyncBaseTransport | None = None,
        stats: Stats | None = None,
        **client_args: Any,
    ) -> Federation:
        """Discover the home cluster and check the token; `ApiError` with one line if not."""
        if mode not in ("home", "direct"):
            raise ValueError(f"mode must be 'home' or 'direct', not {mode!r}")
        client_args.update(
            transport=transport, ca_file=settings.ca_file, insecure=settings.insecure, stats=stats or Stats()
        )
        home = ControllerClient(settings.api_host, settings.token, **client_args)
        try:
            discovery = await home.discovery()
            remotes = _RemoteClients(settings, home.cluster, discovery, **client_args)
            federation = cls(settings, mode, home, remotes)
            ttl = discovery.get("blobSignatureTtl") or DEFAULT_BLOB_SIGNATURE_TTL
            federation.blob_signature_ttl = int(ttl)
            federation.user = await home.current_user()
        except ApiError as e:
            await home.aclose()
            if e.status in (401, 403):
                raise ApiError(
                    e.status, e.cluster, f"the token was rejected ({e.message}); check ARVADOS_API_TOKEN"
                ) from None
            if e.status == 0:
                raise ApiError(0, e.cluster, f"{e.message}; check ARVADOS_API_HOST and the network") from None
            raise
        return federation

    @property
    def remote_clusters(self) -> list[str]:
        return self._remotes.known()

    def controller(self, cluster: str) -> ControllerClient:
        """The API client of `cluster`: the home client (home token) for the home cluster,
        otherwise the remote client made with the token salted for it, in any mode.

        Raises `ApiError` (404) for a cluster the home does not know, (400) for a token
        that cannot be salted. The clients are closed by `aclose`."""
        if cluster == self.home_cluster:
            return self.home
        return self._remotes.get(cluster)

    async def aclose(self) -> None:
        await self.home.aclose()
        await self._remotes.aclose()

    async def get_collection(self, cid: CollectionId) -> CollectionRecord:
        client = self._client_for(cid)
        return await self._pdh_direct(cid) if client is None else await self._fetch(client, cid)

    async def get_summary(self, cid: CollectionId, fields: Sequence[str]) -> CollectionSummary:
        """The record of UUID `cid` without its manifest text: only `fields` (the API's
        ``select``; they must include ``portable_data_hash``), asked of the cluster that
        `get_collection` would ask. A PDH has no summary: an answer for a PDH is trusted only
        once its manifest hashes to it, so it must carry its manifest (ValueError)."""
        client = self._client_for(cid)
        if cid.is_pdh or client is None or "manifest_text" in fields:
            raise ValueError(f"a summary is of a UUID and without manifest_text, not {cid} / {fields}")
        record = await client.get_collection(cid.text, fields)
        pdh = record.get("portable_data_hash")
        if not isinstance(pdh, str) or not pdh:
            raise ApiError(502, client.cluster, f"the record of {cid} has no portable_data_hash")
        return CollectionSummary(**await self._summary_fields(client, cid, record, pdh))

    def _client_for(self, cid: CollectionId) -> ControllerClient | None:
        """Who is asked for `cid`: the home (home mode, or a home UUID), the owner of a
        remote UUID (direct mode); None for a PDH in direct mode (see `_pdh_direct`)."""
        owner = cid.cluster
        if self.mode == "home" or owner == self.home_cluster:
            return self.home
        return None if owner is None else self._remotes.get(owner)

    async def _fetch(self, client: ControllerClient, cid: CollectionId) -> CollectionRecord:
        record = await client.get_collection(cid.text)
        manifest_text = record.get("manifest_text")
        if not isinstance(manifest_text, str):
            raise ApiError(502, client.cluster, f"the record of {cid} has no manifest_text")
        pdh = record.get("portable_data_hash")
        if cid.is_pdh or not pdh:  # hashing a big manifest takes a while: not on the event loop
            got = await trio.to_thread.run_sync(portable_data_hash, manifest_text)
            if cid.is_pdh and got != cid.text:
                raise ApiError(502, client.cluster, f"answered {cid} with a manifest whose hash is {got}")
            pdh = pdh or got
        fields = await self._summary_fields(client, cid, record, pdh)
        return CollectionRecord(**fields, manifest_text=manifest_text)

    async def _summary_fields(
        self, client: ControllerClient, cid: CollectionId, record: dict[str, Any], pdh: str
    ) -> dict[str, Any]:
        """The `CollectionSummary` fields of `record`, as `client` answered it for `cid`."""
        return {
            "uuid": record.get("uuid") or cid.text,
            "portable_data_hash": pdh,
            "modified_at": parse_timestamp(record.get("modified_at")),
            "cluster": cid.cluster or client.cluster,
            "record": record,
            "route": KeepRoute(client.cluster, client.token.text, await self._services(client)),
        }

    async def _services(self, client: ControllerClient) -> tuple[KeepService, ...]:
        """The client's keep services; for the home, ARVADOS_KEEP_SERVICES if it is set."""
        if client is self.home and self.settings.keep_services:
            return tuple(
                KeepService(f"00000-bi6l4-{i:015d}", url, "proxy")
                for i, url in enumerate(self.settings.keep_services)
            )
        return tuple(await client.keep_services())

    async def _pdh_direct(self, cid: CollectionId) -> CollectionRecord:
        """Home first; then every remote at once, first verified answer wins.

        A home answer with ``+R`` hints is one the home controller fetched from a remote
        (its own fan-out): its blocks would need the home keepstore to proxy them, which
        direct mode avoids, so the remotes are asked too and that answer is the fallback."""
        errors: dict[str, ApiError] = {}
        proxied: CollectionRecord | None = None
        try:
            record = await self._fetch(self.home, cid)
            if "+R" not in record.manifest_text:
                return record
            proxied = record
        except ApiError as e:
            errors[self.home_cluster] = e
        found: list[CollectionRecord] = []

        async def ask(cluster: str, cancel: trio.CancelScope) -> None:
            try:
                found.append(await self._fetch(self._remotes.get(cluster), cid))
                cancel.cancel()
            except ApiError as e:
                errors[cluster] = e

        async with trio.open_nursery() as nursery:
            for cluster in self._remotes.known():
                nursery.start_soon(ask, cluster, nursery.cancel_scope)
        if found:
            return found[0]
        if proxied is not None:
            return proxied
        raise _combined(cid, errors)


def _combined(cid: CollectionId, errors: dict[str, ApiError]) -> ApiError:
    """All 404 -> 404; any 5xx/429/unreachable -> 502; otherwise 422 (controller's rule)."""
    statuses = [e.status for e in errors.values()]
    if all(s == 404 for s in statuses):
        status = 404
    elif any(s == 0 or s == 429 or s >= 500 for s in statuses):
        status = 502
    else:
        status = 422
    detail = ", ".join(f"{c}: {e.status or 'unreachable'}" for c, e in errors.items())
    return ApiError(status, ",".join(errors), f"{cid} not found in the federation ({detail})")
