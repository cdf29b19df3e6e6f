"""`LocalityView` over the real federation: `Federation` for reads, one controller per cluster.

- `resolve` goes through `Federation.get_collection` in the mount's mode, so the route is
  exactly the one a mount would use.
- `copy_at(cluster, pdh)` asks that cluster's own controller, directly, through
  `Federation.controller`: the home controller with the home token; a remote one (its
  host from the home discovery document's ``remoteHosts``) with the token salted for it,
  which is the only token a remote cluster may ever see. The request carries ``forwarded_for`` so that the
  cluster answers from its own database and does not fan the PDH out to its remotes: a
  404 means it has no copy of its own, and so does an answer of ``+R`` locators (signed
  by another cluster), should a controller forward anyway; both return None. Its answer
  carries ``+A`` signatures it issued for exactly the token sent, which its keepstores
  accept on HEAD. The route is that cluster's ``keep_services/accessible`` with the same
  token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from fedmount.api.federation import CollectionRecord, Federation, Mode
from fedmount.arvados.errors import AccessDenied, ApiError, ClusterUnreachable, NotFound
from fedmount.arvados.ids import CollectionId
from fedmount.arvados.manifest import ManifestError, parse_manifest, portable_data_hash
from fedmount.arvados.routes import KeepRoute
from fedmount.arvados.settings import Settings
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.transport import Urllib3Transport
from fedmount.stats import Stats

from .view import ClusterCopy, LookupFailure


def _failure(what: str, exc: ApiError) -> LookupFailure:
    if isinstance(exc, ClusterUnreachable):
        return LookupFailure(f"{what}: cluster {exc.cluster} unreachable ({exc.message})")
    if isinstance(exc, AccessDenied):
        return LookupFailure(
            f"{what}: cluster {exc.cluster} refused the token ({exc.message}); check ARVADOS_API_TOKEN"
        )
    return LookupFailure(f"{what}: {exc}")


def keep_client_for(settings: Settings, stats: Stats | None = None, *, retries: int = 3) -> KeepClient:
    """A KeepClient that trusts what the controller clients trust."""
    transport = Urllib3Transport(ca_file=settings.ca_file, insecure=settings.insecure)
    return KeepClient(transport, stats=stats, retries=retries)


class FederationView:
    def __init__(self, federation: Federation, *, mode: Mode):
        self.federation = federation
        self.home_cluster = federation.home_cluster
        self.mode = mode

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, *, mode: Mode = "home", **connect: Any
    ) -> AsyncIterator[FederationView]:
        """`Federation.connect` (`connect`: its options, such as ``retries`` per API call: fewer
        report a down cluster sooner); raises LookupFailure if the home cluster cannot be used.
        Closes the federation afterwards."""
        try:
            federation = await Federation.connect(settings, mode=mode, **connect)
        except ApiError as exc:
            raise _failure(f"cannot connect to the home cluster {settings.api_host}", exc) from None
        view = cls(federation, mode=mode)
        try:
            yield view
        finally:
            await federation.aclose()

    async def clusters(self) -> list[str]:
        return [self.home_cluster, *self.federation.remote_clusters]

    async def resolve(self, cid: CollectionId) -> CollectionRecord:
        try:
            record = await self.federation.get_collection(cid)
        except ApiError as exc:
            if isinstance(exc, NotFound):
                raise LookupFailure(
                    f"collection {cid} not found on any cluster of the federation "
                    "(or not readable with this token)"
                ) from None
            raise _failure(f"cannot get collection {cid}", exc) from None
        return record

    async def exported_config(self, cluster: str) -> dict:
        """That cluster's exported configuration (``GET /arvados/v1/config``), asked of it directly."""
        try:
            return await self.federation.controller(cluster).call("config")
        except ApiError as exc:
            raise _failure(f"cannot read the configuration of cluster {cluster}", exc) from None

    async def copy_at(self, cluster: str, pdh: str) -> ClusterCopy | None:
        try:
            client = self.federation.controller(cluster)
        except ApiError as exc:
            raise LookupFailure(f"cannot ask cluster {cluster}: {exc.message}") from None
        try:
            # forwarded_for: answer from this cluster's own database, never fan out to others
            # (reference/arvados-protocol.md §2 tryLocalThenRemotes); no local copy is a 404.
            record = await client.call(
                f"collections/{quote(pdh, safe='')}", {"forwarded_for": f"{self.home_cluster}-"}
            )
            text = record.get("manifest_text") or ""
            if portable_data_hash(text) != pdh:
                raise LookupFailure(f"cluster {cluster} answered {pdh} with another collection's manifest")
            locators = parse_manifest(text).blocks()
            if any(loc.remote is not None and loc.signature is None for loc in locators):
                return None  # forwarded from another cluster: no copy of its own
            services = await client.keep_services()
        except ApiError as exc:
            if isinstance(exc, NotFound):
                return None
            raise _failure(f"cannot ask cluster {cluster}", exc) from None
        except ManifestError as exc:
            raise LookupFailure(f"cluster {cluster} sent a malformed manifest for {pdh}: {exc}") from None
        route = KeepRoute(cluster, client.token.text, tuple(services))
        return ClusterCopy(cluster, str(record.get("uuid") or pdh), locators, route)
