"""``--route auto`` for locate and stage over the in-test federation of tests/test_locality.py:
its fake keepstores (which check each cluster's token and signatures) and the real KeepClient,
TieredCache and `AutoRoutes` (what a mount's `Federation` builds in auto mode), with a fake
source of remote keep routes standing in for the remotes' ``keep_services/accessible``."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import pytest
from test_locality import (  # tests/ is on sys.path under pytest
    HOME,
    TOKEN,
    UUID_B,
    B,
    C,
    FakeFederation,
    FakeKeepstores,
    cache_at,
    locate,
    make_block,
    record,
    services,
    signature,
)

from fedmount import cli
from fedmount.api.federation import CollectionRecord
from fedmount.api.route_choice import AutoRoutes
from fedmount.arvados.errors import ClusterUnreachable
from fedmount.arvados.ids import CollectionId
from fedmount.arvados.manifest import portable_data_hash
from fedmount.arvados.routes import KeepRoute
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.throughput import ThroughputBook
from fedmount.locality.arguments import build_locate_parser, build_stage_parser
from fedmount.locality.stage import stage_with
from fedmount.runner.mounts import fedmount_args
from fedmount.runner.spec import parse_record
from fedmount.runner.staging import MOUNT_ROUTE

KiB = 1 << 10
UUID_MIXED = "zzzzz-4zz18-00000000000000m"


class AutoFederation(FakeFederation):
    """Auto mode: records come through the home (``+R`` locators) on a home route carrying a
    real `AutoRoutes`, whose trial asks `own_route` (a remote's keep services, salted token)."""

    def __init__(self, keep: FakeKeepstores):
        super().__init__(keep, mode="auto")
        self.refused: set[str] = set()  # clusters whose keep_services/accessible cannot be reached
        self.trials: list[str] = []
        self.choice = AutoRoutes(self.own_route)
        self.mixed: dict[str, list[tuple[str, bytes]]] = {}  # uuid -> (owner, block) in order

    async def own_route(self, cluster: str) -> KeepRoute:
        self.trials.append(cluster)
        if cluster in self.refused:
            raise ClusterUnreachable(cluster, "connection refused")
        return KeepRoute(cluster, TOKEN[cluster], services(cluster))

    def add_mixed(self, uuid: str, parts: list[tuple[str, bytes]]) -> None:
        """A home collection whose blocks the home proxies from several owners."""
        for owner, data in parts:
            self.keep.blocks[owner][hashlib.md5(data).hexdigest()] = data
        blocks = [data for _, data in parts]
        self.collections[uuid] = (portable_data_hash(self._manifest(blocks, None)), blocks)
        self.mixed[uuid] = parts

    async def resolve(self, cid: CollectionId) -> CollectionRecord:
        home_route = KeepRoute(HOME, TOKEN[HOME], services(HOME), remotes=self.choice)
        parts = self.mixed.get(cid.text)
        if parts is not None:
            locs = []
            for owner, data in parts:
                h = hashlib.md5(data).hexdigest()
                locs.append(f"{h}+{len(data)}+R{owner}-{signature(owner, h)}")
            text = f". {' '.join(locs)} 0:{sum(len(d) for _, d in parts)}:data.bin\n"
            return record(cid.text, self.collections[cid.text][0], text, HOME, home_route)
        found = await super().resolve(cid)  # as home mode
        return dataclasses.replace(found, route=home_route)


@pytest.fixture
def keep() -> FakeKeepstores:
    return FakeKeepstores()


@pytest.fixture
def auto(keep: FakeKeepstores) -> AutoFederation:
    return AutoFederation(keep)


def heads(keep: FakeKeepstores, cluster: str) -> int:
    return sum(1 for m, c, _ in keep.calls if m == "HEAD" and c == cluster)


def gets(keep: FakeKeepstores, cluster: str) -> int:
    return sum(1 for m, c, _ in keep.calls if m == "GET" and c == cluster)


# locate ------------------------------------------------------------------------------


async def test_locate_auto_reads_a_reachable_remote_directly(auto: AutoFederation, keep: FakeKeepstores,
                                                              tmp_path: Path) -> None:
    blocks = [make_block(f"a{i}", 1000) for i in range(3)]
    auto.add(UUID_B, blocks, on=(B,))
    book = ThroughputBook(None, default=1000.0)
    book.record(B, 1 << 20, 1.0)
    report = await locate(auto, keep, cache_at(tmp_path), [UUID_B], book=book)
    doc = report.to_json()
    assert doc["mode"] == "auto" and report.exit_status() == 0
    (col,) = doc["collections"]
    assert col["route"] == {"cluster": HOME, "mode": "auto", "remotes": {B: {
        "way": "direct", "reason": "its keep services answered with the token salted for it", "error": None}}}
    assert col["served_by"] == {B: {"blocks": 3, "bytes": 3000, "via": None}}
    assert [b["via"] for b in col["block_list"]] == [None, None, None]
    # the estimate is B's own rate, for every uncached byte
    assert col["estimate"] | {"seconds": None} == {"bytes": 3000, "seconds": None, "cluster": B,
                                                   "bytes_per_second": 1 << 20, "throughput": "observed"}
    assert list(col["estimate_by_cluster"]) == [B]
    # one trial, then one HEAD at B's keep services beyond the three of B's own copy; none at the home
    assert auto.trials == [B] and heads(keep, B) == 3 + 1 and heads(keep, HOME) == 0
    assert f"{B}'s blocks: read directly (its keep services answered" in report.render()


async def test_locate_auto_says_home_and_why_when_the_remote_keep_services_cannot_be_reached(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    blocks = [make_block(f"h{i}", 500) for i in range(2)]
    auto.add(UUID_B, blocks, on=(B,))
    keep.blocks[HOME].update(keep.blocks[B])  # what the home keepstore proxies
    auto.refused.add(B)
    report = await locate(auto, keep, cache_at(tmp_path), [UUID_B])
    col = report.to_json()["collections"][0]
    way = col["route"]["remotes"][B]
    assert way["way"] == "home" and "connection refused" in way["reason"] and way["error"] is None
    assert col["served_by"] == {B: {"blocks": 2, "bytes": 1000, "via": HOME}}
    assert col["estimate"]["cluster"] == HOME and list(col["estimate_by_cluster"]) == [HOME]
    assert heads(keep, HOME) == 1 and report.exit_status() == 0  # the HEAD through the home confirms
    assert f"{B}'s blocks: read through {HOME} (" in report.render()


async def test_locate_auto_failed_direct_head_sends_the_cluster_home_as_a_failed_read_does(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    auto.add(UUID_B, [make_block("f", 700)], on=(B,))
    keep.blocks[HOME].update(keep.blocks[B])
    keep.status[B] = 503  # its controller answers, its keepstores do not
    report = await locate(auto, keep, cache_at(tmp_path), [UUID_B])
    way = report.to_json()["collections"][0]["route"]["remotes"][B]
    assert way["way"] == "home" and "HTTP 503" in way["reason"] and way["error"] is None
    assert auto.choice.state(B) == "home"  # a mount would now read B's blocks through the home too
    assert report.to_json()["collections"][0]["served_by"][B]["via"] == HOME


async def test_locate_auto_a_way_whose_head_fails_leaves_the_answer_incomplete(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    auto.add(UUID_B, [make_block("n", 100)], on=(B,))
    auto.refused.add(B)  # through the home, which does not have it either
    report = await locate(auto, keep, cache_at(tmp_path), [UUID_B])
    way = report.to_json()["collections"][0]["route"]["remotes"][B]
    assert way["way"] == "home" and "not found" in way["error"]
    assert report.exit_status() == 2 and "error: block" in report.render()


async def test_locate_auto_estimate_sums_the_clusters_the_way_contacts(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    from_b, from_c = make_block("mb", 2000), make_block("mc", 1000)
    auto.add_mixed(UUID_MIXED, [(B, from_b), (C, from_c)])
    keep.blocks[HOME].update(keep.blocks[C])
    auto.refused.add(C)
    book = ThroughputBook(None, default=1000.0)
    book.record(B, 1 << 20, 1.0)
    report = await locate(auto, keep, cache_at(tmp_path), [UUID_MIXED], book=book)
    col = report.to_json()["collections"][0]
    assert {name: w["way"] for name, w in col["route"]["remotes"].items()} == {B: "direct", C: "home"}
    assert col["served_by"] == {B: {"blocks": 1, "bytes": 2000, "via": None},
                                C: {"blocks": 1, "bytes": 1000, "via": HOME}}  # fmt: skip
    by = col["estimate_by_cluster"]
    assert (by[B]["bytes"], by[B]["throughput"]) == (2000, "observed")
    assert (by[HOME]["bytes"], by[HOME]["seconds"], by[HOME]["throughput"]) == (1000, 1.0, "default")
    total = col["estimate"]
    assert (total["bytes"], total["cluster"], total["throughput"]) == (3000, None, "default")
    assert total["seconds"] == pytest.approx(by[B]["seconds"] + by[HOME]["seconds"], abs=1e-3)
    assert f"({B} " in report.render() and f"estimates for {HOME} use the default" in report.render()


async def test_locate_home_mode_has_no_ways_and_asks_no_remote_keep_services(
    keep: FakeKeepstores, tmp_path: Path
) -> None:
    home = FakeFederation(keep, mode="home")
    home.add(UUID_B, [make_block("m", 100)], on=(B,))
    col = (await locate(home, keep, cache_at(tmp_path), [UUID_B])).to_json()["collections"][0]
    assert col["route"] == {"cluster": HOME, "mode": "home"} and heads(keep, B) == 1  # B's copy only


# stage -------------------------------------------------------------------------------


class Slow:
    """The fake keepstores, each request taking a few milliseconds (a measurable transfer)."""

    def __init__(self, keep: FakeKeepstores):
        self.keep = keep

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        threading.Event().wait(0.02)
        return self.keep(*args, **kwargs)


def slow_client(keep: FakeKeepstores) -> KeepClient:
    return KeepClient(Slow(keep), retries=0, backoff=0)  # type: ignore[arg-type]


async def test_stage_auto_reads_a_reachable_remote_directly_and_measures_it(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    blocks = [make_block(f"s{i}", 300 * KiB) for i in range(3)]
    auto.add(UUID_B, blocks, on=(B,))
    book = ThroughputBook(None)
    report = await stage_with([UUID_B], auto, slow_client(keep), cache_at(tmp_path), progress_stream=None,
                              book=book)  # fmt: skip
    assert report.complete
    assert gets(keep, B) == 3 and gets(keep, HOME) == 0  # salted token, B's signatures: checked by the fakes
    assert book.get(B).observed and not book.get(HOME).observed


async def test_stage_auto_reads_through_the_home_when_the_remote_cannot_be_reached(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    blocks = [make_block(f"u{i}", 300 * KiB) for i in range(3)]
    auto.add(UUID_B, blocks, on=(B,))
    keep.blocks[HOME].update(keep.blocks[B])
    auto.refused.add(B)
    book = ThroughputBook(None)
    report = await stage_with([UUID_B], auto, slow_client(keep), cache_at(tmp_path), progress_stream=None,
                              book=book)  # fmt: skip
    assert report.complete and gets(keep, HOME) == 3 and gets(keep, B) == 0 and auto.trials == [B]
    assert book.get(HOME).observed and not book.get(B).observed


async def test_stage_auto_a_failing_direct_read_is_read_again_through_the_home(
    auto: AutoFederation, keep: FakeKeepstores, tmp_path: Path
) -> None:
    blocks = [make_block(f"d{i}", 300 * KiB) for i in range(3)]
    auto.add(UUID_B, blocks, on=(B,))
    keep.blocks[HOME].update(keep.blocks[B])
    keep.status[B] = 503
    book = ThroughputBook(None)
    report = await stage_with([UUID_B], auto, slow_client(keep), cache_at(tmp_path), progress_stream=None,
                              concurrency=1, book=book)  # fmt: skip
    assert report.complete and gets(keep, HOME) == 3
    assert gets(keep, B) == 2  # the first block, one round over B's two keepstores; then home
    assert auto.choice.state(B) == "home"
    assert not book.get(B).observed  # the failed direct read delivered nothing from B


# the command lines and fedmount-run --------------------------------------------------


def test_locate_and_stage_default_to_the_mounts_route() -> None:
    mount_default = cli.build_parser().parse_args(["/mnt"]).route
    assert mount_default == "auto"
    assert build_locate_parser().parse_args([UUID_B]).route == mount_default
    assert build_stage_parser().parse_args([UUID_B]).route == mount_default
    assert build_stage_parser().parse_args([UUID_B, "--route", "home"]).route == "home"


def test_stage_to_cluster_refuses_route_direct_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_stage_parser().parse_args([UUID_B, "--to-cluster", HOME]).route == "auto"
    with pytest.raises(SystemExit) as info:
        build_stage_parser().parse_args([UUID_B, "--to-cluster", HOME, "--route", "direct"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and "--route direct cannot apply to --to-cluster" in err


def test_fedmount_run_stages_and_checks_along_its_mounts_route() -> None:
    spec = parse_record({
        "command": ["true"], "container_image": "img", "output_path": "/out",
        "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
    })  # fmt: skip
    args = fedmount_args(["fedmount"], spec, "/mnt", docker=False, cache_dir="/c", crunchstat_interval=10)
    assert "--route" not in args  # the run's fedmount takes the mount's default route
    assert MOUNT_ROUTE == cli.build_parser().parse_args(args[1:]).route


async def test_locate_auto_without_a_saltable_token_says_every_remote_is_read_through_the_home(
    keep: FakeKeepstores, tmp_path: Path
) -> None:
    unsalted = FakeFederation(keep, mode="auto")  # auto mode, but its routes carry no choice (a v1 token)
    unsalted.add(UUID_B, [make_block("v1", 100)], on=(B,))
    keep.blocks[HOME].update(keep.blocks[B])
    col = (await locate(unsalted, keep, cache_at(tmp_path), [UUID_B])).to_json()["collections"][0]
    way = col["route"]["remotes"][B]
    assert way["way"] == "home" and "cannot be salted" in way["reason"] and way["error"] is None
    assert heads(keep, HOME) == 1
