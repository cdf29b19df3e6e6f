"""The Keep client, cache and reader against real emulated keepstores with injected faults.

Each scenario is named after the failure it proves. Blocks are read the way a home-mode
mount reads them: the home controller's signed manifest (``+R`` locators for remote
collections) sent unchanged to the home cluster's keepstores with the home token.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from fedmount.arvados.errors import BlockError, BlockNotFound
from fedmount.arvados.ids import Locator
from fedmount.arvados.manifest import parse_manifest
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.fetcher import BlockReader
from fedmount.blocks.keep import KeepClient, probe_order
from fedmount.blocks.transport import Timeouts
from fedmount.stats import Stats
from integration.harness import Federation


def home_route(fed: Federation) -> KeepRoute:
    reply = fed.request(fed.home, "/arvados/v1/keep_services/accessible", token=fed.token())
    assert reply.status == 200, reply.body
    services = tuple(
        KeepService(
            item["uuid"],
            f"{'https' if item['service_ssl_flag'] else 'http'}://{item['service_host']}:{item['service_port']}/",
            item["service_type"],
            item.get("read_only", False),
        )
        for item in reply.json()["items"]
    )
    return KeepRoute(fed.home, fed.token(), services)


def manifest_of(fed: Federation, uuid: str) -> str:
    reply = fed.request(fed.home, f"/arvados/v1/collections/{uuid}", token=fed.token())
    assert reply.status == 200, reply.body
    return reply.json()["manifest_text"]


def service_name(fed: Federation, service: KeepService) -> str:
    """``keep0``/``keep1``: the emulator's name for a home keep service."""
    roots = [url.rstrip("/") for url in fed.keep_services()]
    return f"keep{roots.index(service.root_url.rstrip('/'))}"


def one_block_collection(fed: Federation, name: str, size: int = 3 << 20) -> tuple[Locator, bytes]:
    data = hashlib.sha256(name.encode()).digest() * (size // 32)
    entry = fed.add_collection(fed.home, name, {"data.bin": data})
    manifest = parse_manifest(manifest_of(fed, entry["uuid"]))
    (locator,) = manifest.blocks()
    return locator, data


async def test_keepstore_down_fails_over_to_replica(fed: Federation) -> None:
    route = home_route(fed)
    locator, data = one_block_collection(fed, "blocks-failover")
    first, second = probe_order(locator.hash, route.services)
    fed.set_fault(fed.home, service_name(fed, first), down="refuse")
    stats = Stats()
    mark = fed.mark()
    assert await KeepClient(stats=stats, backoff=0).get(locator, route) == data
    served = fed.wait_requests(mark, count=1, status=200, service=service_name(fed, second))
    assert served and served[0]["method"] == "GET"
    assert stats.get("keep_errors", cluster=fed.home) == 1


async def test_corrupt_block_is_refetched_never_served(fed: Federation) -> None:
    route = home_route(fed)
    locator, data = one_block_collection(fed, "blocks-corrupt")
    first, _ = probe_order(locator.hash, route.services)
    fed.set_fault(fed.home, service_name(fed, first), corrupt=True)
    stats = Stats()
    keep = KeepClient(stats=stats, backoff=0)
    assert await keep.get(locator, route) == data
    assert stats.get("keep_bad_md5", cluster=fed.home, service=first.uuid) == 1
    for service in route.services:
        fed.set_fault(fed.home, service_name(fed, service), corrupt=True)
    with pytest.raises(BlockError) as info:
        await keep.get(locator, route)
    assert "bad md5" in str(info.value) and fed.token().split("/")[2] not in str(info.value)


async def test_corrupt_bytes_never_reach_a_file_reader(fed: Federation, tmp_path) -> None:
    route = home_route(fed)
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(40000))
    entry = fed.add_collection(fed.home, "blocks-reader-corrupt", {"f.bin": data})
    manifest = parse_manifest(manifest_of(fed, entry["uuid"]))
    ((_, file),) = manifest.walk()
    for service in route.services:
        fed.set_fault(fed.home, service_name(fed, service), corrupt=True)
    reader = BlockReader(KeepClient(backoff=0, retries=1), TieredCache(str(tmp_path), 1 << 30, 64 << 20))
    handle = reader.open(file, route)
    with pytest.raises(BlockError):
        await handle.read(0, 4096)
    fed.clear_faults()
    assert await handle.read(0, len(data)) == data


async def test_stalled_keepstore_is_abandoned_for_replica(fed: Federation) -> None:
    route = home_route(fed)
    locator, data = one_block_collection(fed, "blocks-stall")
    first, _ = probe_order(locator.hash, route.services)
    fed.set_fault(fed.home, service_name(fed, first), stall=True)
    keep = KeepClient(timeouts=Timeouts(connect=2, stall=1), backoff=0, hedge_after=0)  # unhedged
    started = time.monotonic()
    assert await keep.get(locator, route) == data
    assert time.monotonic() - started < 10


async def test_block_missing_everywhere_is_not_found(fed: Federation) -> None:
    route = home_route(fed)
    locator, _ = one_block_collection(fed, "blocks-missing")
    for service in route.services:
        assert fed.delete_block(fed.home, service_name(fed, service), str(locator))
    with pytest.raises(BlockNotFound, match=locator.key.replace("+", r"\+")):
        await KeepClient(backoff=0).get(locator, route)


async def test_remote_block_read_through_home_keepstore_with_home_token(fed: Federation, tmp_path) -> None:
    route = home_route(fed)
    entry = fed.collections["nested"]  # owned by another cluster
    manifest = parse_manifest(manifest_of(fed, entry["uuid"]))
    assert all(loc.remote for loc in manifest.blocks())
    mark = fed.mark()
    reader = BlockReader(KeepClient(), TieredCache(str(tmp_path), 1 << 30, 64 << 20))
    for path, file in manifest.walk():
        want = entry["files"][path]
        got = await reader.open(file, route).read(0, file.size)
        assert hashlib.md5(got).hexdigest() == want["md5"]
    gets = fed.wait_requests(
        mark, count=1, method="GET", cluster=fed.home, where=lambda r: r["service"].startswith("keep")
    )
    assert gets and all(r["token"] == fed.token() and "+R" in r["path"] for r in gets)
