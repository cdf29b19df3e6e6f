"""FederationView over `httpx.MockTransport` controllers: which cluster is asked, with which
token, how "no copy of its own" is recognised, and how failures become one-line reports."""

from __future__ import annotations

import httpx
import pytest

from fedmount.arvados.ids import parse_collection_id
from fedmount.arvados.manifest import portable_data_hash
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import parse_token, salt_for
from fedmount.locality.federation_view import FederationView
from fedmount.locality.view import LookupFailure

TOKEN = parse_token("v2/zzzzz-gj3su-000000000000000/3kg6k6lzmp9kj5cpkcoxie963cmvjahbt2fod9zru30k1jqdmi")
HOSTS = {"zzzzz": "home.test", "zbbbb": "b.test", "zcccc": "c.test"}
BLOCK = "acbd18db4cc2f85cedef654fccc4a4d8+3"
PLAIN = f". {BLOCK} 0:3:foo.txt\n"
PDH = portable_data_hash(PLAIN)
UUID = "zbbbb-4zz18-000000000000001"


def signed(hint: str) -> str:
    return PLAIN.replace(BLOCK, f"{BLOCK}+{hint}")


class Clusters:
    """Three controllers: B has its own copy, C has none, home only forwards (+R)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # (host, path with query, token)
        self.refuse: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append((host, str(request.url.raw_path, "ascii"), token))
        cluster = next(c for c, h in HOSTS.items() if h == host)
        if path.endswith("/rest"):
            return httpx.Response(200, json={
                "uuidPrefix": cluster, "rootUrl": f"https://{host}/", "servicePath": "arvados/v1/",
                "remoteHosts": {c: h for c, h in HOSTS.items() if c != cluster},
            })  # fmt: skip
        if host in self.refuse:
            return httpx.Response(401, json={"errors": ["Not logged in"]})
        if path.endswith("/users/current"):
            return httpx.Response(200, json={"uuid": "zzzzz-tpzed-000000000000000"})
        if path.endswith("/keep_services/accessible"):
            return httpx.Response(200, json={"items": [{
                "uuid": f"{cluster}-bi6l4-000000000000000", "service_host": f"keep.{host}",
                "service_port": 25107, "service_ssl_flag": False, "service_type": "disk",
            }]})  # fmt: skip
        ident = path.rsplit("/", 1)[1]
        hints = {"zbbbb": "A", "zzzzz": "Rzbbbb-"}  # home only has what it proxies from B
        if cluster in hints and ident in (PDH, UUID):
            text = signed(hints[cluster] + "b" * 40 + "@7fffffff")
            return httpx.Response(200, json={"uuid": UUID, "portable_data_hash": PDH, "manifest_text": text})
        return httpx.Response(404, json={"errors": ["not found"]})


@pytest.fixture
def clusters() -> Clusters:
    return Clusters()


def settings() -> Settings:
    return Settings("home.test", TOKEN)


async def test_copy_at_asks_each_cluster_directly_with_its_token(clusters: Clusters) -> None:
    async with FederationView.open(settings(), transport=httpx.MockTransport(clusters)) as view:
        assert await view.clusters() == ["zzzzz", "zbbbb", "zcccc"]
        copy = await view.copy_at("zbbbb", PDH)
        assert copy is not None and copy.uuid == UUID
        assert [str(loc) for loc in copy.locators] == [f"{BLOCK}+A{'b' * 40}@7fffffff"]
        assert copy.route.cluster == "zbbbb" and copy.route.token == salt_for(TOKEN, "zbbbb").text
        assert [s.root_url for s in copy.route.services] == ["http://keep.b.test:25107/"]
        assert await view.copy_at("zcccc", PDH) is None  # 404: no copy
        assert await view.copy_at("zzzzz", PDH) is None  # +R only: forwarded, not its own
    asked = [(h, p) for h, p, _ in clusters.seen if "/collections/" in p]
    assert all(p.endswith("?forwarded_for=zzzzz-") for _, p in asked)  # never fanned out
    assert {h for h, _ in asked} == {"home.test", "b.test", "c.test"}
    cluster_of = {h: c for c, h in HOSTS.items()}
    for host, _, token in clusters.seen:  # a remote only ever sees the token salted for it
        if host != "home.test":
            assert token in ("", salt_for(TOKEN, cluster_of[host]).text)


async def test_resolve_uses_the_mounts_route_and_reports_unknown_ids(clusters: Clusters) -> None:
    async with FederationView.open(settings(), transport=httpx.MockTransport(clusters)) as view:
        resolved = await view.resolve(parse_collection_id(UUID))
        assert resolved.portable_data_hash == PDH and resolved.route.cluster == "zzzzz"
        assert resolved.route.token == TOKEN.text
        with pytest.raises(LookupFailure, match="not found on any cluster of the federation"):
            await view.resolve(parse_collection_id("zcccc-4zz18-000000000000009"))
    transport = httpx.MockTransport(clusters)
    async with FederationView.open(settings(), mode="direct", transport=transport) as view:
        direct = await view.resolve(parse_collection_id(UUID))
        assert direct.route.cluster == "zbbbb" and direct.route.token == salt_for(TOKEN, "zbbbb").text


async def test_refused_token_is_one_line_per_cluster(clusters: Clusters) -> None:
    clusters.refuse.add("c.test")
    async with FederationView.open(settings(), transport=httpx.MockTransport(clusters)) as view:
        with pytest.raises(LookupFailure) as info:
            await view.copy_at("zcccc", PDH)
    message = str(info.value)
    assert "zcccc refused the token" in message and "\n" not in message and TOKEN.secret not in message
    clusters.refuse.add("home.test")
    with pytest.raises(LookupFailure, match="cannot connect to the home cluster"):
        async with FederationView.open(settings(), transport=httpx.MockTransport(clusters)):
            pass
