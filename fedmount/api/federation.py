"""Route a collection UUID or PDH to the cluster that holds it, home-proxied or direct.

`Federation.connect` reads the home cluster's discovery document (its cluster id,
``remoteHosts``, ``blobSignatureTtl``) and checks the token with ``users/current``, so a
wrong token or an unreachable home fails at mount time with one line. A v1 token (a bare
secret) is then turned into its v2 form with the uuid the home gives for it
(``api_client_authorizations/current``), so that it can be salted for a remote cluster,
by fedmount (direct mode) or by the home keepstore (``+R`` blocks); if the home does not
say, the v1 token is used as it is and whatever needs salting says why it cannot.

A UUID of a cluster the home does not know (not in ``remoteHosts``) is refused without a
request, in either mode, with the same one line.

Three modes (reference/arvados-protocol.md §2, §6 "What a client should do"):

- *home* (the default, what Arvados clients do): every lookup goes to the home
  controller, which proxies a remote UUID to its owner by prefix and fans a PDH out to
  every remote. Blocks are read from the home keep services with the home token; remote
  blocks carry ``+R<cluster>-<sig>`` hints and the home keepstore proxies them.
- *direct* (for a home whose keepstores cannot proxy): a UUID of cluster C is fetched from
  ``remoteHosts[C]`` with the token salted for C, and its blocks are read from C's own
  keep services with that salted token. A PDH is asked of the home first, then (if the
  home lacks it, or only has it through its own remote fan-out) of every remote
  concurrently; the first verified answer wins.
- *auto*: lookups as in home mode; each home route carries `AutoRoutes` (route_choice.py),
  which reads a remote cluster's ``+R`` blocks from that cluster's own keep services with
  the salted token while they answer, and through the home keepstore otherwise. Loading a
  record whose blocks name a remote cluster (the first ``+R`` hint) makes that choice for
  it, if not made yet. With a token that cannot be salted (v1 without a uuid) it is home mode.

The home token never reaches another cluster, by construction: the only code that makes
a client for a cluster other than home is `_RemoteClients.get`, which builds it with
``salt_for(token, cluster)`` and refuses a token it cannot salt. `Federation.controller`
is the public way to talk to one cluster's API directly (e.g. `fedmount locate` asking
each cluster for its own copy): the home client for the home cluster, otherwise that
same salted remote client.

An answer is trusted only if its manifest hashes to the PDH it stands for: the PDH asked
for, or the one a UUID's record claims. Otherwise it is rejected with an error naming the
cluster (the controller treats a lying remote as a 502, and so do we), so no manifest is
ever shown or served under a PDH it does not hash to. The hash (md5 of the stripped text)
is computed in a worker thread: a 25 MB manifest takes a fraction of a second.

`Federation.get_summary` asks for a UUID's record without its manifest text (``select``),
routed as `get_collection` routes it; the home controller passes ``select`` on when it
forwards a remote UUID. It is what a mounted UUID collection's re-check asks for; there is
no summary of a PDH, since only its manifest can verify an answer.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from calendar import timegm
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from fedmount.arvados.errors import (
    AccessDenied,
    ApiError,
    ApiRefused,
    BadAnswer,
    ClusterUnreachable,
    NotFound,
    TokenNotSaltable,
    UnknownCluster,
    transient,
)
from fedmount.arvados.ids import CLUSTER_RE, CollectionId
from fedmount.arvados.manifest import portable_data_hash
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import V2_NEEDED, TokenError, salt_for
from fedmount.stats import Stats

from .controller import ControllerClient
from .route_choice import AutoRoutes

log = logging.getLogger("fedmount.federation")

Mode = Literal["home", "direct", "auto"]
DEFAULT_BLOB_SIGNATURE_TTL = 1209600
DEFAULT_REPLICATION = 2  # the SDK's default when discovery has no defaultCollectionReplication
_REMOTE_HINT_RE = re.compile(r"\+R([a-z0-9]{5})-")
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
    answer: dict[str, Any]  # the API's answer as it came
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
        self._hosts = _remote_hosts(home, discovery.get("remoteHosts"))
        self._via_dns = bool(discovery.get("remoteHostsViaDNS"))
        self._client_args = client_args
        self._clients: dict[str, ControllerClient] = {}

    def known(self) -> list[str]:
        return sorted(c for c in self._hosts if c != self._home)

    def check_known(self, cluster: str) -> None:
        """`UnknownCluster` unless the home can reach `cluster` (``remoteHosts``, or via DNS)."""
        if cluster not in self._hosts and not self._via_dns:
            raise UnknownCluster(cluster, f"cluster {cluster} is not a remote cluster of {self._home}")

    def get(self, cluster: str) -> ControllerClient:
        client = self._clients.get(cluster)
        if client is not None:
            return client
        if cluster == self._home:
            raise ValueError("the home cluster is not a remote")
        self.check_known(cluster)
        host = self._hosts.get(cluster) or f"{cluster}.arvadosapi.com"
        try:
            token = salt_for(self._token, cluster)
        except TokenError as e:
            raise TokenNotSaltable(cluster, str(e)) from None
        if token == self._token and self._token.cluster != cluster:
            raise TokenNotSaltable(
                cluster, f"cannot salt the token for {cluster} (it looks salted already); use home mode"
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
        self.default_replication = DEFAULT_REPLICATION  # copies of a block written (discovery)
        self.user: dict[str, Any] = {}
        saltable = not settings.token.is_v1
        self._auto = AutoRoutes(self._own_route) if mode == "auto" and saltable else None

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
        if mode not in ("home", "direct", "auto"):
            raise ValueError(f"mode must be 'home', 'direct' or 'auto', not {mode!r}")
        client_args.update(
            transport=transport, ca_file=settings.ca_file, insecure=settings.insecure, stats=stats or Stats()
        )
        home = ControllerClient(settings.api_host, settings.token, **client_args)
        try:
            discovery = await home.discovery()
            user = await home.current_user()
            if settings.token.is_v1:
                settings = await _with_v2_token(home, settings)
            remotes = _RemoteClients(settings, home.cluster, discovery, **client_args)
            federation = cls(settings, mode, home, remotes)
            ttl = discovery.get("blobSignatureTtl") or DEFAULT_BLOB_SIGNATURE_TTL
            federation.blob_signature_ttl = int(ttl)
            replication = discovery.get("defaultCollectionReplication") or DEFAULT_REPLICATION
            federation.default_replication = int(replication)
            federation.user = user
        except ApiError as e:
            await home.aclose()
            if isinstance(e, AccessDenied):
                raise AccessDenied(
                    e.cluster, f"the token was rejected ({e.message}); check ARVADOS_API_TOKEN", e.status
                ) from None
            if isinstance(e, ClusterUnreachable):
                hint = "check ARVADOS_API_HOST and the network"
                raise ClusterUnreachable(e.cluster, f"{e.message}; {hint}") from None
            raise
        return federation

    @property
    def remote_clusters(self) -> list[str]:
        return self._remotes.known()

    def controller(self, cluster: str) -> ControllerClient:
        """The API client of `cluster`: the home client (home token) for the home cluster,
        otherwise the remote client made with the token salted for it, in any mode.

        Raises `UnknownCluster` for a cluster the home does not know, `TokenNotSaltable`
        for a token that cannot be salted. The clients are closed by `aclose`."""
        if cluster == self.home_cluster:
            return self.home
        return self._remotes.get(cluster)

    async def home_route(self) -> KeepRoute:
        """Where blocks are written: the home cluster's keep services, with the home token."""
        return KeepRoute(self.home_cluster, self.home.token.text, await self._services(self.home))

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
            raise BadAnswer(client.cluster, f"the record of {cid} has no portable_data_hash")
        return CollectionSummary(**await self._summary_fields(client, cid, record, pdh))

    def _client_for(self, cid: CollectionId) -> ControllerClient | None:
        """Who is asked for `cid`: the home (home and auto mode, or a home UUID), the owner of a
        remote UUID (direct mode); None for a PDH in direct mode (see `_pdh_direct`)."""
        owner = cid.cluster
        if owner is not None and owner != self.home_cluster:
            self._remotes.check_known(owner)
        if self.mode != "direct" or owner == self.home_cluster:
            return self.home
        return None if owner is None else self._remotes.get(owner)

    async def _fetch(self, client: ControllerClient, cid: CollectionId) -> CollectionRecord:
        record = await client.get_collection(cid.text)
        manifest_text = record.get("manifest_text")
        if not isinstance(manifest_text, str):
            raise BadAnswer(client.cluster, f"the record of {cid} has no manifest_text")
        got = await trio.to_thread.run_sync(portable_data_hash, manifest_text)
        if cid.is_pdh and got != cid.text:
            raise BadAnswer(client.cluster, f"answered {cid} with a manifest whose hash is {got}")
        claimed = record.get("portable_data_hash") or got
        if claimed != got:
            raise BadAnswer(client.cluster, f"the record of {cid} claims portable data hash {claimed} "
                                            f"but its manifest hashes to {got}")
        fields = await self._summary_fields(client, cid, record, got)
        if self._auto is not None and client is self.home:
            remote = _REMOTE_HINT_RE.search(manifest_text)
            if remote is not None:  # its route is decided now, not at the first read
                await self._auto.direct(remote.group(1))
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
            "answer": record,
            "route": KeepRoute(client.cluster, client.token.text, await self._services(client),
                               remotes=self._auto if client is self.home else None),
        }

    async def _own_route(self, cluster: str) -> KeepRoute:
        """`cluster`'s own keep services and the token salted for it (auto mode's direct reads)."""
        client = self._remotes.get(cluster)
        return KeepRoute(cluster, client.token.text, tuple(await client.keep_services()))

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


def _remote_hosts(home: str, listed: Any) -> dict[str, str]:
    """The discovery document's ``remoteHosts`` without the entries whose key is not a cluster
    id (it would become a stats label and a log line), each dropped with one warning."""
    hosts: dict[str, str] = {}
    for cluster, host in (listed if isinstance(listed, dict) else {}).items():
        if CLUSTER_RE.match(cluster) and isinstance(host, str):
            hosts[cluster] = host
        else:
            log.warning("cluster %s lists a remote %.40r at %.80r: not a cluster id and host; ignored",
                        home, cluster, host)  # fmt: skip
    return hosts


async def _with_v2_token(home: ControllerClient, settings: Settings) -> Settings:
    """`settings` with the v2 form of its v1 token, the home client switched to it; as they
    were, with one warning, if the home does not give a uuid of its own for the token."""
    try:
        record = await home.call("api_client_authorizations/current")
        token = settings.token.with_uuid(str(record.get("uuid") or ""))
        if token.cluster != home.cluster:
            raise TokenError(f"its uuid {token.uuid} is not of {home.cluster}")
    except (ApiError, TokenError) as e:
        log.warning("ARVADOS_API_TOKEN is a v1 token whose uuid %s did not give (%s): reading "
                    "remote clusters' collections %s", home.cluster, e, V2_NEEDED)
        return settings
    log.info("ARVADOS_API_TOKEN is a v1 token; using its v2 form (uuid %s)", token.uuid)
    home.token = token
    return dataclasses.replace(settings, token=token)


def _combined(cid: CollectionId, errors: dict[str, ApiError]) -> ApiError:
    """The controller's rule for a lookup every cluster failed: all not found -> `NotFound`;
    any unreachable, failing or lying cluster -> `ApiError`; otherwise (refusals,
    not all of them 404) -> `NotFound` too, as the controller's 422 means."""
    detail = ", ".join(f"{c}: {_outcome(e)}" for c, e in errors.items())
    clusters, message = ",".join(errors), f"{cid} not found in the federation ({detail})"
    if any(transient(e) or isinstance(e, BadAnswer) for e in errors.values()):
        return ApiError(clusters, message)
    return NotFound(clusters, message, 404 if all(isinstance(e, NotFound) for e in errors.values()) else 422)


def _outcome(error: ApiError) -> str:
    """What one cluster answered, in a word, for `_combined`'s message."""
    if isinstance(error, ApiRefused):
        return str(error.status)
    return "unreachable" if isinstance(error, ClusterUnreachable) else type(error).__name__
