"""Admission: room in the cache for readers — holds, the fair queue, idle readers, the kernel's limit."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fedmount.blocks.admission import IDLE, MAX_HOLD, Admission
from fedmount.stats import Stats

MiB = 1 << 20
BLOCK = 64 * MiB


class Cache:
    """What Admission needs of a block cache: its capacity and the held keys."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held: set[str] = set()

    def hold(self, key: str) -> None:
        self.held.add(key)

    def release(self, key: str) -> None:
        self.held.discard(key)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(blocks: int = 2) -> tuple[Admission, Cache, Clock, Stats]:
    cache, clock, stats = Cache(blocks * BLOCK), Clock(), Stats()
    return Admission(cache, stats, clock), cache, clock, stats  # type: ignore[arg-type]


def read_through(admission: Admission, key: str, start: int = 0, step: int = 4 * MiB) -> None:
    for offset in range(start, BLOCK, step):
        admission.read(key, BLOCK, offset, offset + step)


async def test_a_fetch_beyond_the_room_waits_its_turn_in_order() -> None:
    admission, cache, _, stats = make(blocks=2)
    for key in ("a", "b"):
        assert await admission.fetch(key, BLOCK) is False  # fits: no wait
        admission.fetched(key, reader_at=0)  # held for a sequential reader
    assert cache.held == {"a", "b"}
    admitted: list[str] = []

    async def wait(key: str) -> None:
        assert await admission.fetch(key, BLOCK) is True
        admitted.append(key)

    async with trio.open_nursery() as nursery:
        for key in ("c", "d"):
            nursery.start_soon(wait, key)
            await trio.testing.wait_all_tasks_blocked()
        assert admitted == [] and admission.queued == 2
        read_through(admission, "b")  # b's reader is past it: the first in line goes
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == ["c"] and cache.held == {"a"}
        read_through(admission, "a")
    assert admitted == ["c", "d"]
    assert stats.get("fetch_waits") == 2


async def test_readers_of_one_block_hold_it_until_the_last_is_past_it() -> None:
    admission, cache, _, _ = make()
    await admission.fetch("a", BLOCK)
    admission.fetched("a", reader_at=0)
    admission.read("a", BLOCK, 0, MiB)  # the first reader, at the start
    admission.read("a", BLOCK, 40 * MiB, 41 * MiB)  # a second reader, further in: its own cursor
    read_through(admission, "a", start=41 * MiB, step=MiB)
    assert cache.held == {"a"}  # the first reader is still at 1 MiB
    admission.read("a", BLOCK, 3 * MiB, 4 * MiB)  # out of order, behind the cursor: belongs to it
    read_through(admission, "a", start=MiB, step=MiB)
    assert cache.held == set()


async def test_an_idle_reader_lets_its_block_go_when_someone_waits() -> None:
    admission, cache, clock, _ = make(blocks=1)
    await admission.fetch("a", BLOCK)
    admission.fetched("a", reader_at=0)
    admission.read("a", BLOCK, 0, 40 * MiB)  # its file ends inside the block: the reader stops there
    with trio.move_on_after(0.05):
        await admission.fetch("b", BLOCK)
        pytest.fail("admitted while the reader of a was active")
    clock.now += IDLE + 0.1
    with trio.fail_after(2):
        await admission.fetch("b", BLOCK)
    assert cache.held == set()


async def test_a_block_read_for_too_long_is_let_go_when_others_wait() -> None:
    admission, cache, clock, _ = make(blocks=1)
    await admission.fetch("a", BLOCK)
    admission.fetched("a", reader_at=0)
    offset = 0

    async def slow_reader() -> None:  # never idle, never at the end
        nonlocal offset
        while "a" in cache.held:
            offset += 4096
            admission.read("a", BLOCK, offset, offset + 4096)
            clock.now += 0.5
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        with trio.fail_after(5):
            await admission.fetch("b", BLOCK)
        assert clock.now - 100 > MAX_HOLD


async def test_a_read_ahead_never_jumps_the_queue() -> None:
    admission, _, _, _ = make(blocks=2)
    await admission.fetch("a", BLOCK)
    admission.fetched("a", reader_at=0)
    assert admission.try_fetch("p", BLOCK)  # room for one more: a read-ahead fetch may take it
    admission.fetched("p", reader_at=None)  # arrived; not held
    await admission.fetch("b", BLOCK)
    admission.fetched("b", reader_at=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.fetch, "c", BLOCK)
        await trio.testing.wait_all_tasks_blocked()
        assert not admission.try_fetch("q", MiB)  # someone waits: no read-ahead fetch, however small
        read_through(admission, "a")
    assert admission.committed("c")


async def test_a_block_larger_than_the_cache_is_read_alone() -> None:
    admission, _, _, _ = make(blocks=1)
    assert await admission.fetch("big", 3 * BLOCK) is False  # nothing else committed: admitted
    admission.fetched("big", reader_at=None)
    assert await admission.fetch("next", BLOCK) is False


async def test_requests_beyond_what_the_kernel_lets_wait_go_over_budget() -> None:
    admission, _, _, stats = make(blocks=1)
    admission.max_waiting = 2
    await admission.fetch("a", BLOCK)
    admission.fetched("a", reader_at=0)
    async with trio.open_nursery() as nursery:
        for key in ("w1", "w2"):
            nursery.start_soon(admission.fetch, key, BLOCK)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == 2
        with trio.fail_after(1):  # the third would fill the kernel's queue: it goes at once
            assert await admission.fetch("over", BLOCK) is False
        assert stats.get("fetch_over_budget") == 1
        nursery.cancel_scope.cancel()
    assert admission.queued == 0  # cancelled waiters leave the queue


async def test_a_cached_block_read_sequentially_is_held_if_there_is_room() -> None:
    admission, cache, _, _ = make(blocks=1)
    admission.read("a", BLOCK, 0, MiB)  # found in the cache: held
    assert cache.held == {"a"}
    admission.read("b", BLOCK, 0, MiB)  # no room left: served, not held
    assert cache.held == {"a"}
