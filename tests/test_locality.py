"""locate / stage / unpin over an in-test federation: a fake `LocalityView`, the real
KeepClient over an in-process block transport that checks tokens and signatures like a
keepstore, and the real TieredCache in a temporary directory. No sockets."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from keepfakes import received  # tests/ is on sys.path under pytest

from fedmount.api.federation import CollectionRecord
from fedmount.arvados.ids import CollectionId, Locator
from fedmount.arvados.manifest import portable_data_hash
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.blocks.cache import TieredCache
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.throughput import ThroughputBook
from fedmount.blocks.transport import Response, Sink, Timeouts
from fedmount.locality.locate import locate_collections
from fedmount.locality.locate_report import SCHEMA
from fedmount.locality.stage import stage_with, unpin_collections
from fedmount.locality.view import ClusterCopy, LookupFailure

MiB = 1 << 20
HOME, B, C = "zzzzz", "zbbbb", "zcccc"
TOKEN = {HOME: "v2/zzzzz-gj3su-000000000000000/home", B: "v2/zzzzz-gj3su-000000000000000/saltb",
         C: "v2/zzzzz-gj3su-000000000000000/saltc"}  # fmt: skip


def signature(cluster: str, block_hash: str) -> str:
    """What `cluster` signs `block_hash` with for the token it is sent (a stand-in HMAC)."""
    return hashlib.sha1(f"{cluster}:{TOKEN[cluster]}:{block_hash}".encode()).hexdigest() + "@7fffffff"


def services(cluster: str) -> tuple[KeepService, ...]:
    return tuple(
        KeepService(f"{cluster}-bi6l4-00000000000000{i}", f"http://keep{i}.{cluster}.test/") for i in (0, 1)
    )


class FakeKeepstores:
    """A BlockTransport for every cluster: 401 without the cluster's token, 400 on a signature
    that cluster did not issue, 404 for a block it lacks, `status[cluster]` when set."""

    def __init__(self) -> None:
        self.blocks: dict[str, dict[str, bytes]] = {HOME: {}, B: {}, C: {}}
        self.status: dict[str, int] = {}
        self.calls: list[tuple[str, str, str]] = []  # (method, cluster, hash+size)
        self.lock = threading.Lock()

    def __call__(
        self, method: str, url: str, headers: Mapping[str, str], size: int, timeouts: Timeouts, sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        cluster = url.split("/")[2].split(".")[1]
        locator = url.split("/")[3]
        block_hash = locator[:32]
        with self.lock:
            self.calls.append((method, cluster, f"{block_hash}+{size}"))
        if cluster in self.status:
            return Response(self.status[cluster])
        if headers.get("Authorization") != f"Bearer {TOKEN[cluster]}":
            return Response(401)
        if f"+A{signature(cluster, block_hash)}" not in locator and "+R" not in locator:
            return Response(400)
        data = self.blocks[cluster].get(block_hash)
        if data is None:
            return Response(404)
        if method == "HEAD":
            return Response(200)
        sink(memoryview(data))
        return Response(200, received(data, into))

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.calls if m == method)


def record(uuid: str, pdh: str, text: str, owner: str, route: KeepRoute) -> CollectionRecord:
    return CollectionRecord(uuid=uuid, portable_data_hash=pdh, modified_at=None, cluster=owner, answer={},
                            route=route, manifest_text=text)


def make_block(seed: str, size: int) -> bytes:
    out = hashlib.sha256(seed.encode()).digest()
    return (out * (size // len(out) + 1))[:size]


class FakeFederation:
    """A LocalityView: which cluster has its own copy of which collection, and its manifest."""

    home_cluster = HOME

    def __init__(self, keep: FakeKeepstores, mode: str = "home"):
        self.mode = mode
        self.keep = keep
        self.collections: dict[str, tuple[str, list[bytes]]] = {}  # uuid -> (pdh, blocks)
        self.copies: dict[str, set[str]] = {HOME: set(), B: set(), C: set()}  # cluster -> pdhs
        self.unreachable: set[str] = set()

    def add(self, uuid: str, blocks: list[bytes], on: tuple[str, ...]) -> str:
        pdh = portable_data_hash(self._manifest(blocks, None))
        self.collections[uuid] = (pdh, blocks)
        for cluster in on:
            self.copies[cluster].add(pdh)
            for data in blocks:
                self.keep.blocks[cluster][hashlib.md5(data).hexdigest()] = data
        return pdh

    @staticmethod
    def _manifest(blocks: list[bytes], signer: str | None, hint: str = "A") -> str:
        locs = []
        for data in blocks:
            h = hashlib.md5(data).hexdigest()
            loc = f"{h}+{len(data)}"
            if signer is not None:
                loc += f"+{hint}{signer + '-' if hint == 'R' else ''}{signature(signer, h)}"
            locs.append(loc)
        return f". {' '.join(locs)} 0:{sum(map(len, blocks))}:data.bin\n"

    async def clusters(self) -> list[str]:
        return [HOME, B, C]

    async def resolve(self, cid: CollectionId) -> CollectionRecord:
        for uuid, (pdh, blocks) in self.collections.items():
            if cid.text in (uuid, pdh):
                owner = uuid[:5]
                if self.mode == "direct" or owner == HOME:
                    text = self._manifest(blocks, owner)
                    return record(uuid, pdh, text, owner, KeepRoute(owner, TOKEN[owner], services(owner)))
                text = self._manifest(blocks, owner, hint="R")  # home proxies: +R<owner>-sig
                return record(uuid, pdh, text, owner, KeepRoute(HOME, TOKEN[HOME], services(HOME)))
        raise LookupFailure(f"collection {cid} not found on any cluster of the federation")

    async def copy_at(self, cluster: str, pdh: str) -> ClusterCopy | None:
        if cluster in self.unreachable:
            raise LookupFailure(f"cannot ask cluster {cluster}: unreachable")
        if pdh not in self.copies[cluster]:
            return None
        blocks = next(b for p, b in self.collections.values() if p == pdh)
        hashes = [hashlib.md5(d).hexdigest() for d in blocks]
        locs = [Locator(h, len(d), (f"A{signature(cluster, h)}",))
                for h, d in zip(hashes, blocks, strict=True)]
        return ClusterCopy(cluster, pdh, locs, KeepRoute(cluster, TOKEN[cluster], services(cluster)))


@pytest.fixture
def keep() -> FakeKeepstores:
    return FakeKeepstores()


@pytest.fixture
def fed(keep: FakeKeepstores) -> FakeFederation:
    return FakeFederation(keep)


def client(keep: FakeKeepstores) -> KeepClient:
    return KeepClient(keep, retries=0, backoff=0)  # type: ignore[arg-type]


def cache_at(tmp_path: Path, disk_limit: int = 1 << 30) -> TieredCache:
    return TieredCache(str(tmp_path / "cache"), disk_limit=disk_limit, ram_limit=MiB)


UUID_B = "zbbbb-4zz18-000000000000001"
UUID_H = "zzzzz-4zz18-000000000000001"
UUID_C = "zcccc-4zz18-000000000000001"


async def locate(fed: FakeFederation, keep: FakeKeepstores, cache: TieredCache, ids: list[str], **kw):  # type: ignore[no-untyped-def]
    book = kw.pop("book", ThroughputBook(None))
    return await locate_collections(ids, fed, client(keep), cache, book, **kw)


# locate ------------------------------------------------------------------------------


async def test_locate_counts_blocks_and_bytes_per_cluster(fed: FakeFederation, keep: FakeKeepstores,
                                                          tmp_path: Path) -> None:
    blocks = [make_block(f"b{i}", 1000 + i) for i in range(4)]
    pdh = fed.add(UUID_B, blocks, on=(B, C))
    del keep.blocks[C][hashlib.md5(blocks[0]).hexdigest()]  # C lost one block
    report = await locate(fed, keep, cache_at(tmp_path), [UUID_B])
    doc = report.to_json()
    assert doc["schema"] == SCHEMA and doc["complete"] and report.exit_status() == 0
    (col,) = doc["collections"]
    assert col["portable_data_hash"] == pdh and col["blocks"] == 4 and col["bytes"] == 4006
    assert col["clusters"][B] | {"estimate": None} == {
        "has_collection": True, "holds_all": True, "blocks_held": 4, "bytes_held": 4006,
        "blocks_missing": 0, "bytes_missing": 0, "blocks_unknown": 0, "bytes_unknown": 0,
        "error": None, "estimate": None,
    }  # fmt: skip
    assert col["clusters"][C]["blocks_held"] == 3 and col["clusters"][C]["bytes_missing"] == 1000
    assert col["clusters"][C]["holds_all"] is False
    assert col["clusters"][HOME]["has_collection"] is False and col["clusters"][HOME]["blocks_missing"] == 4
    # HEADs went to each cluster that has a copy, with that cluster's own token and signatures
    assert keep.count("HEAD") == 9 and keep.count("GET") == 0  # C's missing block: both its services asked
    assert {c for _, c, _ in keep.calls} == {B, C}
    # home mode: B's blocks are served by B through the home keepstore
    assert col["served_by"] == {B: {"blocks": 4, "bytes": 4006, "via": HOME}}
    first = col["block_list"][0]
    assert first["held_by"] == [B] and first["served_by"] == B and first["via"] == HOME
    assert "data.bin" not in str(doc)  # blocks only, no file listing


async def test_locate_cluster_flag_answers_by_exit_status(fed: FakeFederation, keep: FakeKeepstores,
                                                          tmp_path: Path) -> None:
    blocks = [make_block("x", 500), make_block("y", 700)]
    fed.add(UUID_H, blocks, on=(HOME, B))
    del keep.blocks[B][hashlib.md5(blocks[1]).hexdigest()]
    cache = cache_at(tmp_path)
    yes = await locate(fed, keep, cache, [UUID_H], cluster=HOME)
    assert (yes.answer, yes.exit_status()) == ("yes", 0)
    no = await locate(fed, keep, cache, [UUID_H], cluster=B)
    assert (no.answer, no.exit_status()) == ("no", 1)
    assert list(no.to_json()["collections"][0]["clusters"]) == [B]  # only X was asked
    absent = await locate(fed, keep, cache, [UUID_H], cluster=C)
    assert (absent.answer, absent.exit_status()) == ("no", 1)
    bad = await locate(fed, keep, cache, [UUID_H], cluster="zqqqq")
    assert bad.exit_status() == 2 and "not in the federation" in (bad.error or "")
    assert f"{HOME} holds everything: yes" in yes.render()


async def test_locate_reports_cache_and_serving_per_block(fed: FakeFederation, keep: FakeKeepstores,
                                                          tmp_path: Path) -> None:
    blocks = [make_block(f"c{i}", 2000) for i in range(3)]
    fed.add(UUID_H, blocks, on=(HOME, B))
    cache = cache_at(tmp_path)
    await cache.put(f"{hashlib.md5(blocks[0]).hexdigest()}+2000", blocks[0])
    book = ThroughputBook(None, default=1000.0)
    book.record(HOME, 1 << 20, 1.0)
    report = await locate(fed, keep, cache, [UUID_H], book=book)
    col = report.to_json()["collections"][0]
    assert col["cached"] == {"blocks": 1, "bytes": 2000}
    assert col["served_by"] == {"cache": {"blocks": 1, "bytes": 2000},
                                HOME: {"blocks": 2, "bytes": 4000, "via": None}}  # fmt: skip
    assert col["estimate"] | {"seconds": None} == {
        "bytes": 4000, "seconds": None, "cluster": HOME, "bytes_per_second": 1 << 20, "throughput": "observed"
    }
    assert col["estimate"]["seconds"] == pytest.approx(4000 / (1 << 20), abs=1e-3)
    assert col["clusters"][B]["estimate"]["throughput"] == "default"
    assert [b["served_by"] for b in col["block_list"]] == ["cache", HOME, HOME]
    text = report.render()
    assert f"estimates for {B} use the default" in text and "(observed)" in text


async def test_locate_suggests_the_pdh_when_home_has_its_own_copy(fed: FakeFederation, keep: FakeKeepstores,
                                                                  tmp_path: Path) -> None:
    pdh = fed.add(UUID_B, [make_block("h", 100)], on=(B, HOME))
    text = (await locate(fed, keep, cache_at(tmp_path), [UUID_B])).render()
    assert f"note: {HOME} has its own copy; read it by PDH {pdh}" in text
    assert "note:" not in (await locate(fed, keep, cache_at(tmp_path), [pdh])).render()


async def test_direct_mode_serves_from_the_owner(keep: FakeKeepstores, tmp_path: Path) -> None:
    fed = FakeFederation(keep, mode="direct")
    fed.add(UUID_C, [make_block("d", 300)], on=(C,))
    col = (await locate(fed, keep, cache_at(tmp_path), [UUID_C])).to_json()["collections"][0]
    assert col["route"] == {"cluster": C, "mode": "direct"}
    assert col["served_by"] == {C: {"blocks": 1, "bytes": 300, "via": None}}


async def test_bad_and_unknown_ids_are_reported_per_collection(fed: FakeFederation, keep: FakeKeepstores,
                                                               tmp_path: Path) -> None:
    fed.add(UUID_H, [make_block("ok", 10)], on=(HOME,))
    ids = ["not-an-id", "zbbbb-4zz18-00000000000000x", "0" * 32 + "+5", UUID_H]
    report = await locate(fed, keep, cache_at(tmp_path), ids)
    cols = report.to_json()["collections"]
    assert [c["id"] for c in cols] == ids
    assert "invalid UUID" in cols[0]["error"]
    assert "not found" in cols[1]["error"] and "not found" in cols[2]["error"]
    assert cols[3]["error"] is None and cols[3]["complete"]
    assert report.exit_status() == 2 and not report.complete
    assert "not-an-id: error: invalid UUID" in report.render()


async def test_unreachable_cluster_makes_the_answer_incomplete(fed: FakeFederation, keep: FakeKeepstores,
                                                               tmp_path: Path) -> None:
    fed.add(UUID_B, [make_block("u", 100)], on=(B, C))
    fed.unreachable.add(C)
    cache = cache_at(tmp_path)
    report = await locate(fed, keep, cache, [UUID_B])
    c = report.to_json()["collections"][0]["clusters"][C]
    assert c["has_collection"] is None and c["holds_all"] is None and c["blocks_unknown"] == 1
    assert "unreachable" in c["error"]
    assert report.exit_status() == 2
    assert "error: cannot ask cluster zcccc" in report.render()
    assert (await locate(fed, keep, cache, [UUID_B], cluster=B)).exit_status() == 0


async def test_failing_keepstore_leaves_blocks_unknown(fed: FakeFederation, keep: FakeKeepstores,
                                                       tmp_path: Path) -> None:
    fed.add(UUID_B, [make_block("f1", 100), make_block("f2", 200)], on=(B,))
    keep.status[B] = 503
    report = await locate(fed, keep, cache_at(tmp_path), [UUID_B], cluster=B)
    c = report.to_json()["collections"][0]["clusters"][B]
    assert c["blocks_unknown"] == 2 and c["bytes_unknown"] == 300 and c["holds_all"] is None
    assert "HTTP 503" in c["error"] and "1 more" in c["error"]
    assert (report.answer, report.exit_status()) == ("unknown", 2)


async def test_head_requests_are_bounded(fed: FakeFederation, keep: FakeKeepstores, tmp_path: Path) -> None:
    fed.add(UUID_B, [make_block(f"n{i}", 10 + i) for i in range(40)], on=(B, C, HOME))
    in_flight = peak = 0
    lock = threading.Lock()
    inner = keep.__call__

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        threading.Event().wait(0.002)
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    report = await locate_collections([UUID_B], fed, KeepClient(counting, retries=0), cache_at(tmp_path),
                                      ThroughputBook(None), concurrency=5)  # fmt: skip
    assert report.exit_status() == 0 and keep.count("HEAD") == 120
    assert peak <= 5


# stage -------------------------------------------------------------------------------


async def test_stage_fetches_verifies_and_a_rerun_fetches_nothing(fed: FakeFederation, keep: FakeKeepstores,
                                                                  tmp_path: Path) -> None:
    blocks = [make_block(f"s{i}", 3000 + i) for i in range(5)]
    fed.add(UUID_B, blocks, on=(B,))
    keep.blocks[HOME].update(keep.blocks[B])  # what the home keepstore proxies
    cache = cache_at(tmp_path)
    err = io.StringIO()
    report = await stage_with([UUID_B], fed, client(keep), cache, progress_stream=err)
    assert report.complete and report.exit_status() == 0
    col = report.to_json()["collections"][0]
    assert col["fetched"] == {"blocks": 5, "bytes": sum(map(len, blocks))}
    assert col["already_cached"]["blocks"] == 0
    assert keep.count("GET") == 5 and {c for _, c, _ in keep.calls} == {HOME}  # the mount's route
    for data in blocks:
        key = f"{hashlib.md5(data).hexdigest()}+{len(data)}"
        assert await TieredCache(str(tmp_path / "cache"), 1 << 30, MiB).read(key, 0, len(data)) == data
    assert "100%" in err.getvalue().splitlines()[-1] and "5/5 blocks" in err.getvalue()
    again = await stage_with([UUID_B], fed, client(keep), cache, progress_stream=None)
    assert again.complete and keep.count("GET") == 5
    assert again.to_json()["collections"][0]["already_cached"]["blocks"] == 5
    assert "staged" in again.render()


async def test_stage_resumes_after_failures(fed: FakeFederation, keep: FakeKeepstores,
                                            tmp_path: Path) -> None:
    blocks = [make_block(f"r{i}", 1000) for i in range(6)]
    fed.add(UUID_H, blocks, on=(HOME,))
    lost = {hashlib.md5(b).hexdigest(): b for b in blocks[:2]}
    for h in lost:
        del keep.blocks[HOME][h]
    cache = cache_at(tmp_path)
    first = await stage_with([UUID_H], fed, client(keep), cache, progress_stream=None)
    assert not first.complete and first.exit_status() == 2
    col = first.to_json()["collections"][0]
    assert col["fetched"]["blocks"] == 4 and len(col["failed"]) == 2 and "not found" in col["failed"][0]
    assert "NOT fully staged" in first.render()
    keep.blocks[HOME].update(lost)
    gets = keep.count("GET")
    second = await stage_with([UUID_H], fed, client(keep), cache, progress_stream=None)
    assert second.complete and keep.count("GET") - gets == 2


async def test_stage_bad_ids_are_reported_and_the_rest_staged(fed: FakeFederation, keep: FakeKeepstores,
                                                              tmp_path: Path) -> None:
    fed.add(UUID_H, [make_block("g", 10)], on=(HOME,))
    report = await stage_with(["nope", UUID_C, UUID_H], fed, client(keep), cache_at(tmp_path),
                              progress_stream=None)  # fmt: skip
    cols = report.to_json()["collections"]
    assert "invalid" in cols[0]["error"] and "not found" in cols[1]["error"] and cols[2]["complete"]
    assert report.exit_status() == 2


async def test_stage_needs_a_disk_cache(fed: FakeFederation, keep: FakeKeepstores) -> None:
    report = await stage_with([UUID_H], fed, client(keep), TieredCache(None, 0, MiB), progress_stream=None)
    assert report.exit_status() == 2 and "disk tier" in (report.error or "")


async def test_stage_reports_blocks_a_small_cache_evicted_and_pin_prevents_it(
    fed: FakeFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    blocks = [make_block(f"e{i}", MiB) for i in range(4)]
    fed.add(UUID_H, blocks, on=(HOME,))
    small = TieredCache(str(tmp_path / "small"), disk_limit=2 * MiB + MiB // 2, ram_limit=MiB)
    report = await stage_with([UUID_H], fed, client(keep), small, progress_stream=None, concurrency=1)
    assert report.to_json()["collections"][0]["evicted"]["blocks"] == 2 and not report.complete
    assert "evicted again" in report.render()
    pinned = TieredCache(str(tmp_path / "pinned"), disk_limit=2 * MiB + MiB // 2, ram_limit=MiB)
    report = await stage_with([UUID_H], fed, client(keep), pinned, pin=True, progress_stream=None)
    assert report.complete


async def test_pin_and_unpin_keep_shared_blocks_pinned(fed: FakeFederation, keep: FakeKeepstores,
                                                       tmp_path: Path) -> None:
    shared, only_a, only_b = make_block("sh", 100), make_block("a", 100), make_block("b", 100)
    pdh_a = fed.add(UUID_H, [shared, only_a], on=(HOME,))
    fed.add(UUID_C, [shared, only_b], on=(C,))
    keep.blocks[HOME].update(keep.blocks[C])
    cache = cache_at(tmp_path)
    report = await stage_with([UUID_H, UUID_C], fed, client(keep), cache, pin=True, progress_stream=None)
    assert report.complete and keep.count("GET") == 3  # the shared block once
    key = {d: f"{hashlib.md5(d).hexdigest()}+100" for d in (shared, only_a, only_b)}
    assert cache.pinned() == set(key.values())
    assert cache.pins_of(pdh_a) is not None

    (a,) = await unpin_collections([pdh_a], cache)  # recorded: no view needed
    assert (a.error, a.blocks) == (None, 1)
    assert cache.pinned() == {key[shared], key[only_b]}

    results = await unpin_collections([UUID_C, "bad", UUID_B], cache)
    assert results[0].blocks == 2 and cache.pinned() == set()
    assert "invalid" in (results[1].error or "") and "not pinned" in (results[2].error or "")


async def test_unpin_resolves_ids_it_has_no_record_of(fed: FakeFederation, keep: FakeKeepstores,
                                                      tmp_path: Path) -> None:
    data = make_block("p", 100)
    fed.add(UUID_H, [data], on=(HOME,))
    cache = cache_at(tmp_path)
    cache.pin([f"{hashlib.md5(data).hexdigest()}+100"])  # pinned by something else than stage

    @asynccontextmanager
    async def open_view() -> AsyncIterator[FakeFederation]:
        yield fed

    (r,) = await unpin_collections([UUID_H], cache, open_view)
    assert (r.error, r.blocks) == (None, 1) and cache.pinned() == set()
