"""KeepClient against an in-process transport: probe order, failover, md5, stalls, retries;
the transport's minimum-rate rule (`RateFloor`) on a fake clock."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping

import pytest
import trio

from fedmount.arvados.ids import Locator, parse_locator
from fedmount.blocks.keep import (
    BlockError,
    BlockNotFound,
    KeepClient,
    KeepRoute,
    KeepService,
    probe_order,
)
from fedmount.blocks.md5 import MultiHasher, available_kernels
from fedmount.blocks.transport import RateFloor, Response, Sink, Timeouts, TransportError
from fedmount.stats import Stats

TOKEN = "v2/zzzzz-gj3su-000000000000000/secretsecretsecret"
SIG = "+A" + "f" * 40 + "@7fffffff"


def block(data: bytes, hints: str = SIG) -> Locator:
    return parse_locator(f"{hashlib.md5(data).hexdigest()}+{len(data)}{hints}")


Behaviour = Callable[[str, bytes], Response]  # (method, stored bytes) -> response


class FakeKeep:
    """A BlockTransport: each service root maps to a behaviour; every request is recorded."""

    def __init__(self, data: bytes | list[bytes], behaviours: Mapping[str, Behaviour | BaseException]):
        self.blocks = {hashlib.md5(d).hexdigest(): d for d in ([data] if isinstance(data, bytes) else data)}
        self.behaviours = behaviours
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.chunk = 3  # bytes per chunk handed to the sink

    def __call__(
        self, method: str, url: str, headers: Mapping[str, str], size: int, timeouts: Timeouts, sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        with self.lock:
            self.calls.append((method, url, dict(headers)))
        root = url[: url.index("/", 8) + 1]
        behaviour = self.behaviours[root]
        if isinstance(behaviour, BaseException):
            raise behaviour
        resp = behaviour(method, self.blocks[url[len(root) : len(root) + 32]])
        if resp.body is not None:
            view = memoryview(resp.body)
            for i in range(0, len(view), self.chunk):  # deliver in small chunks like a socket would
                sink(view[i : i + self.chunk])
        return resp

    def roots(self) -> list[str]:
        return [url[: url.index("/", 8) + 1] for _, url, _ in self.calls]


def ok(method: str, data: bytes) -> Response:
    return Response(200, bytearray(data) if method == "GET" else None)


def status(code: int) -> Behaviour:
    return lambda method, data: Response(code)


def corrupt(method: str, data: bytes) -> Response:
    return Response(200, bytearray(b"X" + data[1:]))


def services(n: int) -> tuple[KeepService, ...]:
    return tuple(KeepService(f"zzzzz-bi6l4-{i:015x}", f"http://keep{i}.test:25107/") for i in range(n))


def route(svcs: tuple[KeepService, ...]) -> KeepRoute:
    return KeepRoute("zzzzz", TOKEN, svcs)


def client(transport: FakeKeep, **kw: object) -> tuple[KeepClient, Stats]:
    stats = Stats()
    return KeepClient(transport, stats=stats, backoff=0, **kw), stats  # type: ignore[arg-type]


def test_probe_order_matches_arvados_test_vectors() -> None:
    # sdk/python/tests/test_keep_client.py KeepClientRendezvousTestCase: block i is the
    # 64-character string "%064x" % i, services are zzzzz-bi6l4-%015x for 0..15.
    svcs = services(16)
    expected = ["3eab2d5fc9681074", "097dba52e648f1c3", "c5b4e023f8a7d691", "9d81c02e76a3bf54"]
    for i, order in enumerate(expected):
        block_hash = hashlib.md5(f"{i:064x}".encode()).hexdigest()
        got = "".join(f"{int(s.uuid[-15:], 16):x}" for s in probe_order(block_hash, svcs))
        assert got == order


async def test_get_sends_locator_unchanged_with_headers_in_probe_order() -> None:
    data = b"hello keep"
    loc = block(data, "+Rzbbbb-" + "a" * 40 + "@7fffffff")
    svcs = services(3)
    fake = FakeKeep(data, {s.root_url: ok for s in svcs})
    keep, stats = client(fake)
    assert await keep.get(loc, route(svcs)) == data
    ((method, url, headers),) = fake.calls
    assert method == "GET"
    assert url == probe_order(loc.hash, svcs)[0].root_url + str(loc)
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "application/octet-stream"
    assert headers["X-Request-Id"].startswith("req-") and len(headers["X-Request-Id"]) == 24
    assert stats.get("keep_bytes", cluster="zzzzz") == len(data)
    assert stats.get("keep_requests", cluster="zzzzz") == 1


async def test_empty_block_needs_no_request() -> None:
    fake = FakeKeep(b"", {})
    keep, _ = client(fake)
    assert await keep.get(block(b""), route(services(1))) == b""
    assert fake.calls == []
    assert block(b"").is_empty and not block(b"x").is_empty
    assert not Locator(block(b"").hash, 1).is_empty and not Locator(block(b"x").hash, 0).is_empty


async def test_failover_to_next_replica_on_error() -> None:
    data = b"replicated"
    loc = block(data)
    svcs = services(3)
    first, second, third = probe_order(loc.hash, svcs)
    fake = FakeKeep(
        data,
        {
            first.root_url: TransportError("connect", "refused"),
            second.root_url: status(503),
            third.root_url: ok,
        },
    )
    keep, stats = client(fake)
    assert await keep.get(loc, route(svcs)) == data
    assert fake.roots() == [first.root_url, second.root_url, third.root_url]
    assert stats.get("keep_errors") == 2


async def test_bad_md5_is_never_returned_and_names_the_service(caplog: pytest.LogCaptureFixture) -> None:
    data = b"the real bytes" * 100
    loc = block(data)
    svcs = services(2)
    first, second = probe_order(loc.hash, svcs)
    fake = FakeKeep(data, {first.root_url: corrupt, second.root_url: ok})
    keep, stats = client(fake)
    with caplog.at_level(logging.WARNING, logger="fedmount.keep"):
        assert await keep.get(loc, route(svcs)) == data
    assert stats.get("keep_bad_md5", cluster="zzzzz", service=first.uuid) == 1
    (record,) = caplog.records
    assert first.uuid in record.getMessage() and loc.key in record.getMessage()


async def test_bad_md5_everywhere_is_an_error_without_secrets() -> None:
    data = b"payload"
    loc = block(data)
    svcs = services(2)
    fake = FakeKeep(data, {s.root_url: corrupt for s in svcs})
    keep, stats = client(fake)
    with pytest.raises(BlockError) as info:
        await keep.get(loc, route(svcs))
    message = str(info.value)
    assert not isinstance(info.value, BlockNotFound)
    assert loc.key in message and "\n" not in message
    assert "secret" not in message and "f" * 40 not in message
    assert all(s.root_url in message for s in svcs)
    assert len(fake.calls) == 2  # a service that served bad bytes is not asked again
    assert stats.get("keep_bad_md5") == 2


async def test_not_found_everywhere_raises_block_not_found() -> None:
    data = b"gone"
    svcs = services(3)
    fake = FakeKeep(data, {s.root_url: status(404) for s in svcs})
    keep, _ = client(fake)
    with pytest.raises(BlockNotFound) as info:
        await keep.get(block(data), route(svcs))
    assert block(data).key in str(info.value)
    assert len(fake.calls) == 3  # 404 is final: no retry rounds


async def test_stall_abandons_replica_for_the_next() -> None:
    data = b"slow"
    loc = block(data)
    svcs = services(2)
    first, second = probe_order(loc.hash, svcs)
    fake = FakeKeep(data, {first.root_url: TransportError("stall", "no bytes for 30s"), second.root_url: ok})
    keep, _ = client(fake)
    assert await keep.get(loc, route(svcs)) == data
    assert fake.roots() == [first.root_url, second.root_url]


async def test_slow_replica_is_abandoned_for_the_next_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = b"trickle"
    loc = block(data)
    first, second = probe_order(loc.hash, services(2))
    slow = TransportError("slow", "512 B/s over the last 2s, below the minimum 32768 B/s")
    fake = FakeKeep(data, {first.root_url: slow, second.root_url: ok})
    keep, stats = client(fake)
    with caplog.at_level(logging.WARNING, logger="fedmount.keep"):
        assert await keep.get(loc, route(services(2))) == data
    assert fake.roots() == [first.root_url, second.root_url]
    (line,) = [r.getMessage() for r in caplog.records]
    assert first.uuid in line and loc.key in line and "512 B/s" in line and SIG not in line
    assert stats.get("keep_errors") == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def trickle(floor: RateFloor, clock: FakeClock, rate: float, seconds: float, chunk: int) -> float:
    """Feed `floor` `rate` bytes/s in `chunk`-byte pieces for `seconds`; the time it raised at, else inf."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += chunk / rate
        try:
            floor.received(chunk)
        except TransportError as exc:
            assert exc.kind == "slow"
            return clock.now
    return float("inf")


def test_rate_floor_abandons_a_trickle_one_window_after_it_started() -> None:
    clock = FakeClock()
    start = clock.now
    floor = RateFloor(32 << 10, 2.0, clock)
    raised_at = trickle(floor, clock, rate=512, seconds=60, chunk=25)  # the emulator's 512 B/s shape
    assert 2.0 <= raised_at - start <= 2.1


def test_rate_floor_keeps_a_transfer_at_the_minimum_rate_or_above_even_in_bursts() -> None:
    clock = FakeClock()
    floor = RateFloor(32 << 10, 2.0, clock)
    assert trickle(floor, clock, rate=33 << 10, seconds=30, chunk=4096) == float("inf")
    for _ in range(20):  # nothing for 1.5 s, then 128 KiB at once: 85 KiB/s on average
        clock.now += 1.5
        floor.received(128 << 10)


def test_rate_floor_judges_the_last_window_not_the_whole_transfer() -> None:
    clock = FakeClock()
    floor = RateFloor(32 << 10, 2.0, clock)
    assert trickle(floor, clock, rate=100 << 20, seconds=1, chunk=1 << 20) == float("inf")  # 100 MiB fast
    slowed = clock.now
    raised_at = trickle(floor, clock, rate=512, seconds=60, chunk=25)
    assert raised_at - slowed <= 2.0 * 1.125 + 0.1  # one window and one mark interval, at most


def test_rate_floor_zero_is_no_floor() -> None:
    clock = FakeClock()
    floor = RateFloor(0, 2.0, clock)
    assert trickle(floor, clock, rate=1, seconds=100, chunk=1) == float("inf")


async def test_retries_are_bounded() -> None:
    data = b"flaky"
    svcs = services(2)
    fake = FakeKeep(
        data, {svcs[0].root_url: status(503), svcs[1].root_url: TransportError("network", "reset")}
    )
    keep, _ = client(fake, retries=2)
    with pytest.raises(BlockError, match="HTTP 503") as info:
        await keep.get(block(data), route(svcs))
    assert "network: reset" in str(info.value)
    assert len(fake.calls) == 2 * 3  # two services, three rounds


async def test_transient_error_then_success_on_retry() -> None:
    data = b"eventually"
    answers = iter([Response(503), Response(429)])
    svc = services(1)

    def flaky(method: str, stored: bytes) -> Response:
        return next(answers, None) or ok(method, stored)

    fake = FakeKeep(data, {svc[0].root_url: flaky})
    keep, _ = client(fake)
    assert await keep.get(block(data), route(svc)) == data
    assert len(fake.calls) == 3


async def test_permanent_4xx_is_not_retried() -> None:
    svc = services(1)
    fake = FakeKeep(b"x", {svc[0].root_url: status(401)})
    keep, _ = client(fake)
    with pytest.raises(BlockError, match="HTTP 401"):
        await keep.get(block(b"x"), route(svc))
    assert len(fake.calls) == 1


async def test_failed_service_is_demoted_for_later_blocks() -> None:
    svcs = services(2)
    data = [b"block %d" % i for i in range(10)]
    dead = svcs[0].root_url
    fake = FakeKeep(data, {dead: TransportError("connect", "refused"), svcs[1].root_url: ok})
    keep, _ = client(fake)
    for d in data:
        assert await keep.get(block(d), route(svcs)) == d
    assert fake.roots().count(dead) == 1


async def test_head_locates_block() -> None:
    svcs = services(2)
    data = b"here"
    fake = FakeKeep(data, {svcs[0].root_url: status(404), svcs[1].root_url: ok})
    keep, _ = client(fake)
    assert await keep.head(block(data), route(svcs)) is True
    assert {m for m, _, _ in fake.calls} == {"HEAD"}
    fake = FakeKeep(data, {s.root_url: status(404) for s in svcs})
    keep, _ = client(fake)
    assert await keep.head(block(data), route(svcs)) is False


async def test_no_services_is_a_clear_error() -> None:
    keep, _ = client(FakeKeep(b"", {}))
    with pytest.raises(BlockError, match="no keep services"):
        await keep.get(block(b"abc"), route(()))


@pytest.mark.parametrize("kernel", available_kernels())
async def test_blocks_fetched_at_once_are_verified_together_by_every_kernel(kernel: str) -> None:
    blocks = [bytes([i]) * (3 << 20) + bytes(range(256)) * (i + 1) for i in range(4)]  # 3 MiB and a tail
    fake = FakeKeep(blocks, {services(1)[0].root_url: ok, "http://bad/": corrupt})
    fake.chunk = 1 << 20  # socket-sized chunks
    got: dict[int, bytes] = {}
    with MultiHasher(kernel=kernel) as hasher:
        keep = KeepClient(fake, hasher=hasher, backoff=0, retries=0)

        async def get(i: int) -> None:
            got[i] = bytes(await keep.get(block(blocks[i]), route(services(1))))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(get, i)
        bad = KeepRoute("zzzzz", TOKEN, (KeepService("zzzzz-bi6l4-000000000000bad", "http://bad/"),))
        with pytest.raises(BlockError, match="bad md5"):
            await keep.get(block(blocks[0]), bad)
    assert [got[i] for i in range(4)] == blocks


def test_route_repr_hides_token() -> None:
    assert TOKEN not in repr(route(services(1)))
