"""Shared fixtures: an in-process fake federation behind `httpx.MockTransport` (no sockets).

`FakeFederation` answers the API calls fedmount makes (discovery, users/current,
api_client_authorizations/current, collections/{id}, keep_services/accessible) for
several clusters named by host, checks
the bearer token the way a cluster would (the home accepts its own token; a remote
accepts only the token salted for it), records every request, and can be told to fail
the next requests of a host (a status code or a network exception) to test retries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from fedmount.arvados.manifest import portable_data_hash
from fedmount.arvados.tokens import ApiToken, parse_token, salt_for

HOME_TOKEN = "v2/zzzzz-gj3su-000000000000001/" + "s3cr3t" * 8
SIG = "@7fffffff"


@dataclass
class FakeCluster:
    cluster: str
    host: str
    tokens: set[str]
    remote_hosts: dict[str, str] = field(default_factory=dict)
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_ports: tuple[int, ...] = (25107, 25108)
    fail_next: list[int | Exception] = field(default_factory=list)
    ttl: int = 1209600
    token_uuid: str | None = None  # what api_client_authorizations/current answers; None: 404

    def discovery(self) -> dict[str, Any]:
        return {
            "kind": "discovery#restDescription",
            "rootUrl": f"https://{self.host}/",
            "servicePath": "arvados/v1/",
            "uuidPrefix": self.cluster,
            "blobSignatureTtl": self.ttl,
            "remoteHosts": self.remote_hosts,
        }


@dataclass
class Request:
    host: str
    path: str
    token: str | None


class FakeFederation:
    def __init__(self, remotes: tuple[str, ...] = ("zbbbb", "zcccc")):
        self.token = parse_token(HOME_TOKEN)
        self.home = FakeCluster("zzzzz", "api.zzzzz.example", {HOME_TOKEN})
        self.clusters = {"zzzzz": self.home}
        for cid in remotes:
            salted = salt_for(self.token, cid).text
            self.clusters[cid] = FakeCluster(cid, f"api.{cid}.example", {salted})
            self.home.remote_hosts[cid] = f"api.{cid}.example"
        self.requests: list[Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def by_host(self, host: str) -> FakeCluster:
        return next(c for c in self.clusters.values() if c.host == host)

    def add_collection(self, cluster: str, uuid_suffix: str, files: dict[str, bytes]) -> dict[str, Any]:
        """Store a collection on `cluster` and, the home proxying it, the +R form on the home."""
        tokens, blocks, pos = [], [], 0
        for name, data in files.items():
            blocks.append(f"{hashlib.md5(data).hexdigest()}+{len(data)}")
            tokens.append(f"{pos}:{len(data)}:{name}")
            pos += len(data)
        plain = f". {' '.join(blocks) or 'd41d8cd98f00b204e9800998ecf8427e+0'} {' '.join(tokens)}\n"
        pdh = portable_data_hash(plain)
        uuid = f"{cluster}-4zz18-{uuid_suffix:0>15}"
        signed = plain
        for b in blocks:
            signed = signed.replace(f" {b} ", f" {b}+A{'a' * 40}{SIG} ", 1)
        record = {
            "uuid": uuid,
            "portable_data_hash": pdh,
            "manifest_text": signed,
            "modified_at": "2024-05-06T07:08:09.123456789Z",
            "owner_uuid": f"{cluster}-tpzed-000000000000001",
        }
        self.clusters[cluster].collections[uuid] = record
        self.clusters[cluster].collections[pdh] = dict(record, uuid=pdh)
        if cluster != "zzzzz":
            proxied = dict(record, manifest_text=signed.replace("+A", f"+R{cluster}-"))
            self.home.collections[uuid] = proxied
            self.home.collections[pdh] = dict(proxied, uuid=pdh)  # the home controller's fan-out
        return record

    def tokens_seen(self, host: str) -> set[str | None]:
        return {r.token for r in self.requests if r.host == host}

    def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        auth = request.headers.get("authorization")
        token = auth.removeprefix("Bearer ") if auth else None
        self.requests.append(Request(host, request.url.path, token))
        cluster = self.by_host(host)
        if cluster.fail_next:
            failure = cluster.fail_next.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return _json(failure, {"errors": [f"injected {failure}"]})
        path = unquote(request.url.path)
        if path == "/discovery/v1/apis/arvados/v1/rest":
            return _json(200, cluster.discovery())
        if token not in cluster.tokens:
            return _json(401, {"errors": ["Not logged in"]})
        if path == "/arvados/v1/api_client_authorizations/current" and cluster.token_uuid:
            return _json(200, {"uuid": cluster.token_uuid, "scopes": ["all"]})
        if path == "/arvados/v1/users/current":
            return _json(200, {"uuid": f"{cluster.cluster}-tpzed-000000000000001", "is_active": True})
        if path == "/arvados/v1/keep_services/accessible":
            items = [
                {
                    "uuid": f"{cluster.cluster}-bi6l4-{port:015d}",
                    "service_host": f"keep{i}.{cluster.cluster}.example",
                    "service_port": port,
                    "service_ssl_flag": False,
                    "service_type": "disk",
                    "read_only": False,
                }
                for i, port in enumerate(cluster.keep_ports)
            ]
            return _json(200, {"kind": "arvados#keepServiceList", "items": items})
        if path.startswith("/arvados/v1/collections/"):
            record = cluster.collections.get(path.rsplit("/", 1)[1])
            if record is None:
                return _json(404, {"errors": ["Path not found"]})
            return _json(200, record)
        return _json(404, {"errors": ["no such route"]})


def _json(status: int, body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(status, json=body)


@pytest.fixture
def fake() -> FakeFederation:
    return FakeFederation()


@pytest.fixture
def home_token() -> ApiToken:
    return parse_token(HOME_TOKEN)
