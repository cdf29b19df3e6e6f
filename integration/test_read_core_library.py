"""The read core as a library (settings, federation, manifest, blocks), no mount, against
the emulated federation (TLS controllers, real keepstores, +R proxying, salted tokens).

Every demo collection is resolved by UUID and by PDH in home and in direct mode; its tree
must match the seeded ``files`` (paths and sizes) and every file's bytes must hash to the
seeded md5.
"""

from __future__ import annotations

import hashlib

import pytest

from fedmount.api.federation import Federation
from fedmount.arvados.errors import AccessDenied, ApiError, ClusterUnreachable
from fedmount.arvados.ids import parse_collection_id
from fedmount.arvados.manifest import File, parse_manifest
from fedmount.arvados.settings import Settings
from fedmount.arvados.tokens import parse_token, salt_for
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.fetcher import BlockReader
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.transport import Urllib3Transport
from fedmount.stats import Stats

MiB = 1 << 20


def settings_for(fed, tmp_path) -> Settings:
    return Settings.from_environment(fed.env(), settings_file=str(tmp_path / "none.conf"))


async def read_all(reader: BlockReader, file: File, route) -> str:
    handle = reader.open(file, route)
    digest = hashlib.md5()
    offset = 0
    try:
        while offset < file.size:
            chunk = await handle.read(offset, 4 * MiB)
            assert chunk, f"short read at {offset} of {file.size}"
            digest.update(chunk)
            offset += len(chunk)
    finally:
        handle.close()
    return digest.hexdigest()


def assert_home_token_stayed_home(fed, since: int) -> None:
    home_token = fed.token()
    foreign = [r for r in fed.requests(since=since) if r["cluster"] != fed.home and r["token"] == home_token]
    assert foreign == [], f"the home token reached {sorted({(r['cluster'], r['service']) for r in foreign})}"


@pytest.mark.parametrize("mode", ["home", "direct"])
async def test_every_demo_collection_resolves_and_reads_by_uuid_and_pdh(fed, tmp_path, mode):
    stats = Stats()
    mark = fed.mark()
    federation = await Federation.connect(settings_for(fed, tmp_path), mode=mode, stats=stats)
    keep = KeepClient(Urllib3Transport(ca_file=fed.ca_cert), stats=stats)
    reader = BlockReader(keep, TieredCache(None, 0, 256 * MiB, stats=stats), stats=stats)
    try:
        assert federation.home_cluster == fed.home
        for name, seeded in fed.seeded_collections.items():
            for key in ("uuid", "portable_data_hash"):
                record = await federation.get_collection(parse_collection_id(seeded[key]))
                assert record.portable_data_hash == seeded["portable_data_hash"]
                manifest = parse_manifest(record.manifest_text)
                files = dict(manifest.walk())
                assert {p: f.size for p, f in files.items()} == {
                    p: meta["size"] for p, meta in seeded["files"].items()
                }, name
                if mode == "home":
                    assert record.route.cluster == fed.home
                elif key == "uuid":
                    assert record.route.cluster == seeded["cluster"]
                    assert record.route.token == salt_for(parse_token(fed.token()), seeded["cluster"]).text
                for path, meta in seeded["files"].items():
                    if key == "uuid" or meta["size"] < 4 * MiB:
                        assert await read_all(reader, files[path], record.route) == meta["md5"], (name, path)
    finally:
        await federation.aclose()
    assert_home_token_stayed_home(fed, mark)
    if mode == "direct":
        remote_keep = {r["cluster"] for r in fed.requests(since=mark) if r["service"].startswith("keep")}
        assert remote_keep - {fed.home}, "direct mode read no block from a remote keepstore"


async def test_controller_503s_are_retried_not_reported(fed, tmp_path):
    federation = await Federation.connect(settings_for(fed, tmp_path), mode="direct", backoff=0.05)
    try:
        seeded = fed.collections["nested"]
        fed.set_fault(seeded["cluster"], "controller", status=503, count=2)
        record = await federation.get_collection(parse_collection_id(seeded["uuid"]))
        assert record.route.cluster == seeded["cluster"]
    finally:
        await federation.aclose()


async def test_wrong_token_fails_connect_with_one_line(fed, tmp_path):
    env = fed.env()
    env["ARVADOS_API_TOKEN"] = env["ARVADOS_API_TOKEN"][:-5] + "xxxxx"
    settings = Settings.from_environment(env, settings_file=str(tmp_path / "none.conf"))
    with pytest.raises(ApiError) as info:
        await Federation.connect(settings)
    assert isinstance(info.value, AccessDenied) and "check ARVADOS_API_TOKEN" in str(info.value)
    assert "\n" not in str(info.value) and env["ARVADOS_API_TOKEN"] not in str(info.value)


async def test_remote_controller_down_in_direct_mode_is_a_one_line_error(fed, tmp_path):
    federation = await Federation.connect(settings_for(fed, tmp_path), mode="direct", retries=1, backoff=0.05)
    try:
        seeded = fed.collections["big"]
        fed.set_fault(seeded["cluster"], "controller", down="refuse")
        with pytest.raises(ApiError) as info:
            await federation.get_collection(parse_collection_id(seeded["uuid"]))
        assert isinstance(info.value, ClusterUnreachable) and info.value.cluster == seeded["cluster"]
        assert "\n" not in str(info.value)
    finally:
        await federation.aclose()
