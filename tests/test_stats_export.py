"""The metrics endpoint's bounds (`serve_bounded`) over in-memory streams, and its escaping.

A `MemoryListener` hands the server one half of a `trio.testing.memory_stream_pair` per
"connection"; the autojump clock runs the per-connection deadline without waiting.
"""

from __future__ import annotations

import math
import re

import pytest
import trio
import trio.testing

from fedmount.stats import Stats
from fedmount.stats_export import CONNECTION_SECONDS, MAX_CONNECTIONS, metrics_handler, serve_bounded


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self.accepted = 0

    def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        stream = await self._receive.receive()
        self.accepted += 1
        return stream

    async def aclose(self) -> None:
        await self._receive.aclose()


async def read_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    while chunk := await stream.receive_some():
        out += chunk
    return out


async def test_a_flood_of_idle_connections_holds_at_most_the_limit_and_each_for_its_time(
    autojump_clock,
) -> None:
    stats = Stats()
    stats.add("keep_bytes", 1000, cluster="zbbbb")
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_bounded, metrics_handler(stats), [listener])
        idle = [listener.connect() for _ in range(3 * MAX_CONNECTIONS)]
        scraper = listener.connect()  # behind the flood in the accept queue
        await trio.testing.wait_all_tasks_blocked()
        assert listener.accepted == MAX_CONNECTIONS  # the rest wait, unaccepted
        started = trio.current_time()
        assert await read_all(idle[0]) == b""  # never sent a request: closed, unanswered
        assert trio.current_time() - started == CONNECTION_SECONDS
        await scraper.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = await read_all(scraper)
        assert reply.startswith(b"HTTP/1.0 200 OK") and b'fedmount_keep_bytes{cluster="zbbbb"} 1000' in reply
        assert trio.current_time() - started == 3 * CONNECTION_SECONDS  # the flood drained, 16 at a time
        assert listener.accepted == len(idle) + 1
        nursery.cancel_scope.cancel()


async def test_a_slow_request_is_cut_off_at_the_connection_deadline(autojump_clock) -> None:
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_bounded, metrics_handler(Stats()), [listener])
        slow = listener.connect()
        started = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):  # the server closed its end
            for byte in b"GET /metrics HTTP/1.0\r\nHost: x\r\n":  # one byte a second, 32 s in all
                await slow.send_all(bytes([byte]))
                await trio.sleep(1)
        assert trio.current_time() - started <= CONNECTION_SECONDS + 1
        nursery.cancel_scope.cancel()


def test_label_values_are_escaped_so_they_cannot_add_lines() -> None:
    stats = Stats()
    stats.add("keep_bad_md5", cluster="zzzzz", service='a\\b"} 1\nfedmount_injected 1')
    lines = stats.prometheus_text().splitlines()
    assert lines == [
        "# TYPE fedmount_keep_bad_md5 counter",
        'fedmount_keep_bad_md5{cluster="zzzzz",service="a\\\\b\\"} 1\\nfedmount_injected 1"} 1',
    ]


async def test_an_unknown_path_is_404_and_the_connection_is_closed() -> None:
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_bounded, metrics_handler(Stats()), [listener])
        client = listener.connect()
        await client.send_all(b"GET /secrets HTTP/1.0\r\n\r\n")
        assert re.match(rb"HTTP/1.0 404 ", await read_all(client))
        nursery.cancel_scope.cancel()


def test_a_bound_counter_is_the_same_series_as_add_and_absent_until_added_to() -> None:
    stats = Stats()
    hits = stats.counter("cache_hits", tier="ram")
    assert "cache_hits" not in stats.snapshot() and "cache_hits" not in stats.prometheus_text()
    hits.add()
    hits.add(2)
    stats.add("cache_hits", tier="ram")
    stats.add("cache_hits", tier="disk")
    assert stats.get("cache_hits", tier="ram") == 4
    assert stats.snapshot()["cache_hits"] == {"tier=ram": 4, "tier=disk": 1}
    assert 'fedmount_cache_hits{tier="ram"} 4' in stats.prometheus_text()
    plain = stats.counter("fuse_read_bytes")
    plain.add(4096)
    assert stats.snapshot()["fuse_read_bytes"] == 4096
