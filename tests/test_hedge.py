"""Hedged GETs (hedge.py) against a fake blocking transport: who is hedged, when, who wins,
what the loser may still do, the budget and the delay."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping

import pytest
import trio
from keepfakes import received  # tests/ is on sys.path under pytest

from fedmount import cli
from fedmount.arvados.ids import Locator, parse_locator
from fedmount.blocks.hedge import Hedging
from fedmount.blocks.keep import BlockError, KeepClient, KeepRoute, KeepService, probe_order
from fedmount.blocks.transport import Abort, Response, Sink, Timeouts, TransportError
from fedmount.mount_options import MountOptions
from fedmount.stats import Stats

DATA = bytes(range(256)) * 64  # 16 KiB
LOC: Locator = parse_locator(f"{hashlib.md5(DATA).hexdigest()}+{len(DATA)}")
SERVICES = tuple(KeepService(f"zzzzz-bi6l4-{i:015x}", f"http://keep{i}.test:25107/") for i in range(3))
ROUTE = KeepRoute("zzzzz", "v2/zzzzz-gj3su-000000000000000/secret", SERVICES[:2])
FIRST, SECOND, THIRD = probe_order(LOC.hash, SERVICES[:2]) + [SERVICES[2]]

# (into, sink, abort) -> Response: what one replica does with one GET, in the worker thread
Behaviour = Callable[[memoryview | None, Sink, Abort], Response]


def answer(data: bytes = DATA) -> Behaviour:
    """Sends `data` at once, in two chunks."""

    def run(into: memoryview | None, sink: Sink, abort: Abort) -> Response:
        body = received(data, into)
        view = memoryview(body)
        sink(view[: len(view) // 2])
        sink(view[len(view) // 2 :])
        return Response(200, body)

    return run


def stall(seconds: float = 5.0, then: Behaviour | None = None, scribble: bool = False) -> Behaviour:
    """Headers, then no byte for `seconds` (then `then`, or a stall error) unless aborted first;
    `scribble`: once aborted, writes garbage into `into` before failing, as a last chunk landing
    late would."""

    def run(into: memoryview | None, sink: Sink, abort: Abort) -> Response:
        if abort.wait(seconds):
            if scribble and into is not None:
                time.sleep(0.05)
                into[:] = b"\xee" * len(into)
            raise TransportError("network", "body ended after 0 bytes")
        if then is not None:
            return then(into, sink, abort)
        raise TransportError("stall", f"no bytes for {seconds:g}s")

    return run


def first_byte_then(seconds: float) -> Behaviour:
    """One chunk at once, the rest after `seconds`: slow, but never silent."""

    def run(into: memoryview | None, sink: Sink, abort: Abort) -> Response:
        body = received(DATA, into)
        view = memoryview(body)
        sink(view[:1])
        time.sleep(seconds)
        sink(view[1:])
        return Response(200, body)

    return run


class Replicas:
    """A BlockTransport: a behaviour per service root; records each GET and how it ended."""

    def __init__(self, behaviours: Mapping[KeepService, Behaviour]):
        self.behaviours = {s.root_url: b for s, b in behaviours.items()}
        self.calls: list[str] = []
        self.ended: dict[str, float] = {}  # root -> when its request returned or raised
        self.aborted: set[str] = set()
        self.lock = threading.Lock()

    def __call__(
        self, method: str, url: str, headers: Mapping[str, str], size: int, timeouts: Timeouts, sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        root = url[: url.index("/", 8) + 1]
        abort = Abort.current()
        assert abort is not None
        with self.lock:
            self.calls.append(root)
        try:
            return self.behaviours[root](into, sink, abort)
        finally:
            with self.lock:
                self.ended[root] = time.monotonic()
                if abort.aborted:
                    self.aborted.add(root)


def client(replicas: Replicas, hedge_after: float | None = 0.2, **kw: object) -> tuple[KeepClient, Stats]:
    stats = Stats()
    keep = KeepClient(replicas, stats=stats, backoff=0, hedge_after=hedge_after, **kw)  # type: ignore[arg-type]
    return keep, stats


async def timed_get(keep: KeepClient, into: memoryview | None = None) -> tuple[bytes, float]:
    started = time.monotonic()
    body = await keep.get(LOC, ROUTE, into)
    return bytes(body), time.monotonic() - started


async def test_stalled_first_replica_is_hedged_after_the_delay_and_the_second_wins() -> None:
    replicas = Replicas({FIRST: stall(), SECOND: answer()})
    keep, stats = client(replicas)
    into = memoryview(bytearray(len(DATA)))
    body, seconds = await timed_get(keep, into)
    assert body == DATA and bytes(into) == DATA
    assert 0.2 <= seconds < 2, seconds  # the delay, not the 5 s stall
    assert replicas.calls == [FIRST.root_url, SECOND.root_url]
    assert replicas.aborted == {FIRST.root_url}
    assert stats.get("keep_hedges", cluster="zzzzz") == 1
    assert stats.get("keep_hedge_wins", cluster="zzzzz") == 1
    assert stats.get("keep_errors") == 0  # losing a race is no error
    # The silent loser is demoted: the next block asks the replica that answered first.
    replicas.calls.clear()
    await timed_get(keep)
    assert replicas.calls == [SECOND.root_url]


async def test_fast_first_replica_is_never_hedged() -> None:
    replicas = Replicas({FIRST: first_byte_then(0.5), SECOND: answer()})
    keep, stats = client(replicas, hedge_after=0.1)
    body, seconds = await timed_get(keep, memoryview(bytearray(len(DATA))))
    assert body == DATA and seconds >= 0.5
    assert replicas.calls == [FIRST.root_url]
    assert stats.get("keep_hedges") == 0


async def test_loser_is_aborted_and_never_writes_into_the_winners_buffer() -> None:
    replicas = Replicas({FIRST: stall(scribble=True), SECOND: answer()})
    keep, stats = client(replicas)
    into = memoryview(bytearray(len(DATA)))
    body, seconds = await timed_get(keep, into)
    assert body == DATA and bytes(into) == DATA  # copied in after the loser's last write
    assert replicas.aborted == {FIRST.root_url}
    assert seconds < 2  # the loser stopped at once, not after its 5 s
    assert stats.get("keep_hedge_wins") == 1


async def test_hedge_without_a_cache_buffer_returns_its_own() -> None:
    replicas = Replicas({FIRST: stall(), SECOND: answer()})
    keep, _ = client(replicas)
    body, _ = await timed_get(keep)
    assert body == DATA


async def test_no_hedge_once_the_budget_is_spent() -> None:
    replicas = Replicas({FIRST: stall(0.6), SECOND: answer()})
    keep, stats = client(replicas)
    while keep.hedging.take_hedge():  # 5 hedges and no request in the last 30 s: spent
        pass
    body, seconds = await timed_get(keep)
    assert body == DATA and seconds >= 0.6  # the stall failover, as without hedging
    assert replicas.calls == [FIRST.root_url, SECOND.root_url]
    assert replicas.ended[FIRST.root_url] <= replicas.ended[SECOND.root_url]
    assert stats.get("keep_hedges") == 0


async def test_bad_md5_from_the_hedge_does_not_win() -> None:
    corrupt = answer(b"X" + DATA[1:])
    replicas = Replicas({FIRST: stall(0.6, then=answer()), SECOND: corrupt})
    keep, stats = client(replicas)
    into = memoryview(bytearray(len(DATA)))
    body, seconds = await timed_get(keep, into)
    assert body == DATA and bytes(into) == DATA and seconds >= 0.6  # the first one, still running
    assert stats.get("keep_hedges") == 1 and stats.get("keep_hedge_wins") == 0
    assert stats.get("keep_bad_md5", cluster="zzzzz", service=SECOND.uuid) == 1


async def test_error_of_the_first_while_the_hedge_runs_does_not_fail_the_block() -> None:
    replicas = Replicas({FIRST: stall(0.3), SECOND: first_byte_then(0.3)})
    keep, stats = client(replicas, hedge_after=0.1, retries=0)
    body, _ = await timed_get(keep, memoryview(bytearray(len(DATA))))
    assert body == DATA
    assert stats.get("keep_hedges") == 1 and stats.get("keep_hedge_wins") == 1


async def test_both_failing_is_the_usual_block_error() -> None:
    replicas = Replicas({FIRST: stall(0.3), SECOND: lambda into, sink, abort: Response(503)})
    keep, stats = client(replicas, retries=0)
    with pytest.raises(BlockError) as info:
        await timed_get(keep)
    message = str(info.value)
    assert FIRST.root_url in message and "stall" in message
    assert SECOND.root_url in message and "HTTP 503" in message
    assert stats.get("keep_hedges") == 1


async def test_head_is_never_hedged() -> None:
    head = Replicas({FIRST: stall(0.4, then=lambda into, sink, abort: Response(200)), SECOND: answer()})
    keep, stats = client(head, hedge_after=0.05)
    assert await keep.head(LOC, ROUTE)
    assert head.calls == [FIRST.root_url] and stats.get("keep_hedges") == 0


async def test_hedging_off_waits_for_the_stall() -> None:
    replicas = Replicas({FIRST: stall(0.4), SECOND: answer()})
    keep, stats = client(replicas, hedge_after=0)
    body, seconds = await timed_get(keep)
    assert body == DATA and seconds >= 0.4 and stats.get("keep_hedges") == 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_is_a_tenth_of_the_last_30_seconds_requests_plus_five() -> None:
    clock = Clock()
    hedging = Hedging(None, 15.0, Stats(), clock=clock)
    for _ in range(100):
        hedging.requested()
    taken = 0
    while hedging.take_hedge():
        taken += 1
    assert taken == 15  # 10 % of 100, plus 5
    clock.now += 31  # the requests and hedges of 31 s ago no longer count
    assert sum(hedging.take_hedge() for _ in range(10)) == 5


def test_delay_warms_up_then_follows_the_p95_between_floor_and_cap() -> None:
    hedging = Hedging(None, 15.0, Stats())
    assert hedging.delay("zzzzz") == 1.0  # fewer than 8 samples
    for _ in range(7):
        hedging.first_byte("zzzzz", 0.01)
    assert hedging.delay("zzzzz") == 1.0
    hedging.first_byte("zzzzz", 0.01)
    assert hedging.delay("zzzzz") == 0.5  # 1.5 × 0.01, floored
    for i in range(1, 65):  # the last 64: 0.01 .. 0.64
        hedging.first_byte("zbbbb", 9.0 if i == 1 else 0.0)
    for i in range(1, 65):
        hedging.first_byte("zbbbb", i / 100)
    assert hedging.delay("zbbbb") == pytest.approx(1.5 * 0.61)  # nearest-rank p95 of 64: the 61st
    for _ in range(64):
        hedging.first_byte("zcccc", 4.0)
    assert hedging.delay("zcccc") == 5.0  # min(stall / 3, 5 s)
    short = Hedging(None, 3.0, Stats())
    for _ in range(8):
        short.first_byte("zzzzz", 4.0)
    assert short.delay("zzzzz") == 1.0  # stall / 3
    assert Hedging(None, 1.2, Stats()).delay("zzzzz") == pytest.approx(0.4)  # the cap, also warming up


def test_fixed_delay_and_off() -> None:
    assert Hedging(2.5, 15.0, Stats()).delay("zzzzz") == 2.5
    assert Hedging(0.0, 15.0, Stats()).delay("zzzzz") is None


@pytest.mark.parametrize(("text", "value"), [("auto", None), ("off", 0.0), ("0", 0.0), ("0.75", 0.75)])
def test_keep_hedge_after_option(text: str, value: float | None) -> None:
    opts = MountOptions.from_args(cli.parse_args(["--keep-hedge-after", text, "/m"]))
    assert opts.keep_hedge_after == value
    assert MountOptions.from_args(cli.parse_args(["/m"])).keep_hedge_after is None


def test_abort_before_the_request_reaches_its_socket_fails_it_there() -> None:
    abort = Abort()
    abort.abort()
    with abort.installed(), pytest.raises(TransportError) as info:
        Abort.current().watch(object())  # type: ignore[union-attr, arg-type]
    assert info.value.kind == "aborted"
    assert Abort.current() is None


async def test_cancelled_get_aborts_its_requests() -> None:
    replicas = Replicas({FIRST: stall(), SECOND: stall()})
    keep, _ = client(replicas, hedge_after=0.05)
    started = time.monotonic()
    with trio.move_on_after(0.3):
        await keep.get(LOC, ROUTE)
    assert time.monotonic() - started < 2  # not the 5 s the stalled threads would take
    assert replicas.aborted == {FIRST.root_url, SECOND.root_url}


async def test_get_given_up_by_its_reader_demotes_no_service() -> None:
    replicas = Replicas({FIRST: stall(), SECOND: answer()})
    keep, _ = client(replicas, hedge_after=0)
    with trio.move_on_after(0.2):
        await keep.get(LOC, ROUTE)
    assert replicas.aborted == {FIRST.root_url}
    replicas.behaviours[FIRST.root_url] = answer()
    replicas.calls.clear()
    assert (await timed_get(keep))[0] == DATA
    assert replicas.calls == [FIRST.root_url]  # not lost to a replica: still asked first
