"""`Rechecks` without a network: which collections one request asks about, when an answer
is used, and what a failure or a stalled cluster costs the others."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import trio

from fedmount.arvados.errors import ApiRefused, ClusterUnreachable
from fedmount.arvados.ids import CollectionId, parse_collection_id
from fedmount.fs.rechecks import Rechecks

REFRESH = 10.0


def uid(cluster: str, i: int) -> str:
    return f"{cluster}-4zz18-{i:015d}"


@dataclass
class Known:
    portable_data_hash: str
    modified_at: float | None


@dataclass(eq=False)
class Mounted:
    cid: CollectionId


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


class Source:
    """Answers from `records`; `stalled` clusters wait until `release` is set."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[str, float | None]] = {}
        self.asked: list[tuple[str, list[str]]] = []
        self.failing: set[str] = set()
        self.stalled: set[str] = set()
        self.release = trio.Event()

    async def collection_summaries(
        self, cluster: str, uuids: Sequence[str]
    ) -> dict[str, tuple[str, float | None]]:
        self.asked.append((cluster, list(uuids)))
        if cluster in self.stalled:
            await self.release.wait()
        if cluster in self.failing:
            raise ClusterUnreachable(cluster, "connection refused")
        await trio.sleep(0)
        return {u: self.records[u] for u in uuids if u in self.records}


@pytest.fixture
def setup():
    source, clock = Source(), Clock()
    rechecks = Rechecks(source, clock, REFRESH)
    mounted = [Mounted(parse_collection_id(uid(c, i))) for c in ("zzzzz", "zbbbb") for i in range(3)]
    for m in mounted:
        source.records[m.cid.text] = ("a" * 32 + "+1", 5.0)
        rechecks.track(m)
    return source, clock, rechecks, mounted


SAME = Known("a" * 32 + "+1", 5.0)


async def test_the_first_recheck_asks_for_every_mounted_collection_of_its_cluster_at_once(setup):
    source, clock, rechecks, mounted = setup
    assert await rechecks.unchanged(mounted[1].cid, SAME)
    assert source.asked == [("zzzzz", [uid("zzzzz", 1), uid("zzzzz", 0), uid("zzzzz", 2)])]
    clock.t += REFRESH / 4
    assert await rechecks.unchanged(mounted[0].cid, SAME) and await rechecks.unchanged(mounted[2].cid, SAME)
    assert len(source.asked) == 1  # answered by that request
    assert await rechecks.unchanged(mounted[0].cid, SAME)  # an answer is used once: a new request
    assert source.asked[1] == ("zzzzz", [uid("zzzzz", 0), uid("zzzzz", 1), uid("zzzzz", 2)])


async def test_a_changed_missing_or_old_answer_sends_the_collection_its_own_way(setup):
    source, clock, rechecks, mounted = setup
    source.records[uid("zzzzz", 1)] = ("b" * 32 + "+1", 5.0)  # new content
    source.records[uid("zzzzz", 2)] = ("a" * 32 + "+1", 6.0)  # renamed
    del source.records[uid("zbbbb", 0)]  # deleted
    assert await rechecks.unchanged(mounted[0].cid, SAME)
    assert not await rechecks.unchanged(mounted[1].cid, SAME)
    assert not await rechecks.unchanged(mounted[2].cid, SAME)
    assert not await rechecks.unchanged(mounted[3].cid, SAME)
    source.asked.clear()
    assert await rechecks.unchanged(mounted[4].cid, SAME)  # answered with the one before
    clock.t += REFRESH / 2  # too old to decide: asked again, with those lacking an answer
    assert await rechecks.unchanged(mounted[5].cid, SAME)
    assert source.asked == [("zbbbb", [uid("zbbbb", 2), uid("zbbbb", 0), uid("zbbbb", 1)])]


async def test_a_pdh_or_an_untracked_collection_is_never_batched(setup):
    source, _, rechecks, _ = setup
    assert not await rechecks.unchanged(parse_collection_id(uid("zcccc", 1)), SAME)
    assert not await rechecks.unchanged(parse_collection_id("a" * 32 + "+1"), SAME)
    assert source.asked == []


async def test_concurrent_rechecks_wait_for_the_request_under_way(setup):
    source, _, rechecks, mounted = setup
    results: list[bool] = []

    async def check(m: Mounted) -> None:
        results.append(await rechecks.unchanged(m.cid, SAME))

    async with trio.open_nursery() as nursery:
        for m in mounted[:3]:
            nursery.start_soon(check, m)
    assert results == [True] * 3 and len(source.asked) == 1


async def test_a_cluster_that_is_down_fails_each_recheck_of_that_request_without_more_requests(setup):
    source, clock, rechecks, mounted = setup
    source.failing.add("zzzzz")
    for m in mounted[:3]:
        with pytest.raises(ClusterUnreachable):
            await rechecks.unchanged(m.cid, SAME)
    assert len(source.asked) == 1  # one request for the three, and its failure for each
    source.failing.clear()
    clock.t += REFRESH
    assert await rechecks.unchanged(mounted[0].cid, SAME) and len(source.asked) == 2  # asked again


async def test_a_refused_request_sends_each_its_own_way(setup):
    source, _, rechecks, mounted = setup

    async def refused(cluster: str, uuids: Sequence[str]) -> dict:
        source.asked.append((cluster, list(uuids)))
        raise ApiRefused(cluster, "cannot execute federated list query", 400)

    source.collection_summaries = refused  # type: ignore[method-assign]
    assert not await rechecks.unchanged(mounted[0].cid, SAME)
    assert not await rechecks.unchanged(mounted[1].cid, SAME)
    assert len(source.asked) == 2  # nothing kept of a refusal: each its own way (a get), then asked again


async def test_a_stalled_cluster_holds_only_its_own_collections(setup):
    source, _, rechecks, mounted = setup
    source.stalled.add("zbbbb")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rechecks.unchanged, mounted[3].cid, SAME)
        await trio.sleep(0.01)
        with trio.fail_after(1):
            assert await rechecks.unchanged(mounted[0].cid, SAME)  # zzzzz answers meanwhile
        source.release.set()


async def test_a_collection_let_go_of_is_no_longer_asked_about(setup):
    source, _, rechecks, mounted = setup
    del mounted[1:3]


    gc.collect()
    assert await rechecks.unchanged(mounted[0].cid, SAME)
    assert source.asked == [("zzzzz", [uid("zzzzz", 0)])]
