"""Background API calls with deadlines (`fedmount.fs.calls`), on trio's virtual clock."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from fedmount.fs.calls import MAX_CALLS_PER_CLUSTER, Calls


@pytest.fixture
def calls(nursery) -> Calls:
    calls = Calls(5.0, quiet=(KeyError,))
    calls.nursery = nursery
    return calls


async def test_waiters_share_one_call_and_get_its_answer(calls, autojump_clock):
    runs: list[int] = []

    async def work() -> str:
        runs.append(1)
        await trio.sleep(1)
        return "answer"

    call = calls.start("zbbbb", "a call", work)
    got: list[str] = []

    async def waiter() -> None:
        assert await call.wait()
        got.append(call.result())

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(waiter)
    assert got == ["answer"] * 3 and runs == [1]


async def test_a_call_past_its_deadline_goes_on_and_its_cluster_is_stalled_until_it_ends(
    calls, autojump_clock
):
    release = trio.Event()

    async def stuck() -> str:
        await release.wait()
        return "late"

    started = trio.current_time()
    call = calls.start("zbbbb", "a stuck call", stuck)
    assert not await call.wait() and trio.current_time() - started == 5.0
    assert call.first_late_answer() and not call.first_late_answer()  # one log line per call
    assert calls.stalled("zbbbb") and not calls.stalled("zcccc")
    other = calls.start("zbbbb", "another call", stuck)
    assert not await other.wait() and trio.current_time() - started == 5.0  # no wait at all
    fine = calls.start("zcccc", "a call elsewhere", lambda: trio.sleep(1))
    assert await fine.wait()
    release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert call.result() == "late" and not calls.stalled("zbbbb")
    assert calls.start("zbbbb", "a call after", lambda: trio.sleep(1)).deadline == trio.current_time() + 5.0


async def test_an_exception_is_raised_to_each_waiter_and_logged_only_if_nobody_waits(calls, caplog):
    async def fails() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, "fedmount.fs"):
        waited = calls.start("zbbbb", "waited for", fails)
        assert await waited.wait()
        for _ in range(2):
            with pytest.raises(RuntimeError):
                waited.result()
        assert caplog.records == []  # the waiter reports it (the adapter logs unexpected errors)
        calls.start("zbbbb", "left alone", fails)
        await trio.testing.wait_all_tasks_blocked()
        calls.start("zbbbb", "expected failure", lambda: _raise(KeyError("quiet")))
        await trio.testing.wait_all_tasks_blocked()
    [line] = [r.getMessage() for r in caplog.records]
    assert "left alone failed: RuntimeError: a bug" == line


async def _raise(error: Exception) -> None:
    raise error


async def test_calls_need_the_nursery_of_whoever_serves_them():
    with pytest.raises(RuntimeError, match="nursery"):
        Calls(5.0).start("zbbbb", "a call", lambda: trio.sleep(0))


async def test_a_stalled_cluster_holds_a_bounded_number_of_connections(calls, autojump_clock):
    release, running, most = trio.Event(), [0], [0]

    async def stuck() -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        await release.wait()
        running[0] -= 1

    stalled = [calls.start("zbbbb", f"call {i}", stuck) for i in range(3 * MAX_CALLS_PER_CLUSTER)]
    await trio.testing.wait_all_tasks_blocked()
    assert most[0] == MAX_CALLS_PER_CLUSTER  # the others wait for a slot, holding no connection
    other = calls.start("zcccc", "a call elsewhere", lambda: trio.sleep(0))
    assert await other.wait() and trio.current_time() < other.deadline
    release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert all(call.done for call in stalled) and most[0] == MAX_CALLS_PER_CLUSTER
