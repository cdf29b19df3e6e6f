"""Throughput book and transfer meter (fake clocks), and the book fed by a real KeepClient's counters."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from keepfakes import received  # tests/ is on sys.path under pytest

from fedmount.arvados.ids import parse_locator
from fedmount.arvados.routes import KeepRoute, KeepService
from fedmount.blocks.keep import KeepClient
from fedmount.blocks.throughput import (
    DEFAULT_BYTES_PER_SECOND,
    EWMA_WEIGHT,
    FILE_NAME,
    ThroughputBook,
    TransferMeter,
)
from fedmount.blocks.transport import Response, Sink, Timeouts
from fedmount.stats import Stats

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_book_defaults_records_ewma_and_ignores_tiny_samples(tmp_path: Path) -> None:
    book = ThroughputBook.in_cache_dir(tmp_path)
    tp = book.get("zbbbb")
    assert (tp.bytes_per_second, tp.observed, tp.source) == (DEFAULT_BYTES_PER_SECOND, False, "default")
    assert not book.record("zbbbb", 1000, 1.0)  # latency-dominated
    assert book.record("zbbbb", 100 * MiB, 1.0)
    assert book.get("zbbbb").bytes_per_second == 100 * MiB and book.get("zbbbb").observed
    book.record("zbbbb", 50 * MiB, 1.0)
    expected = (1 - EWMA_WEIGHT) * 100 * MiB + EWMA_WEIGHT * 50 * MiB
    assert book.get("zbbbb").bytes_per_second == pytest.approx(expected)
    assert book.get("zbbbb").seconds_for(int(expected)) == pytest.approx(1.0)
    book.save()
    again = ThroughputBook.in_cache_dir(tmp_path)
    assert again.get("zbbbb").bytes_per_second == pytest.approx(expected) and again.get("zbbbb").samples == 2


def test_book_save_merges_with_another_writer(tmp_path: Path) -> None:
    a, b = ThroughputBook.in_cache_dir(tmp_path), ThroughputBook.in_cache_dir(tmp_path)
    a.record("zbbbb", 10 * MiB, 1.0)
    b.record("zcccc", 20 * MiB, 1.0)
    a.save()
    b.save()
    clusters = json.loads((tmp_path / FILE_NAME).read_text())["clusters"]
    assert set(clusters) == {"zbbbb", "zcccc"}


def test_book_ignores_a_corrupt_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    assert not ThroughputBook.in_cache_dir(tmp_path).get("zzzzz").observed
    assert "ignoring unreadable throughput file" in caplog.text


def test_meter_counts_parallel_fetches_as_one_busy_period() -> None:
    clock = Clock()
    meter = TransferMeter(clock)
    meter.start("zbbbb")
    meter.start("zbbbb")
    clock.now += 2
    meter.finish("zbbbb", 10 * MiB)
    clock.now += 2
    meter.finish("zbbbb", 10 * MiB)
    clock.now += 10  # idle: not counted
    meter.start("zbbbb")
    clock.now += 1
    meter.finish("zbbbb", 0)  # a failed fetch still took time
    assert meter.busy == {"zbbbb": 5.0} and meter.bytes == {"zbbbb": 20 * MiB}
    book = ThroughputBook(None)
    meter.record_into(book)
    assert book.get("zbbbb").bytes_per_second == pytest.approx(4 * MiB)


def test_a_meter_of_request_seconds_records_bytes_over_those_seconds() -> None:
    meter = TransferMeter()
    meter.add("zcccc", nbytes=30 * MiB, seconds=2.0)
    meter.add("zcccc", seconds=1.0)  # a failed request: its time counts, no bytes
    book = ThroughputBook(None)
    meter.record_into(book)
    assert book.get("zcccc").bytes_per_second == pytest.approx(10 * MiB)
    TransferMeter().record_into(book)  # nothing measured: no change, no error
    assert book.get("zcccc").samples == 1


async def test_a_mounts_keep_counters_make_the_cluster_observed(tmp_path: Path) -> None:
    """What the daemon does at unmount: its KeepClient's meter, folded in and saved."""
    data = bytes(range(256)) * 4096  # 1 MiB
    delay = 0.05

    def slow_keep(
        method: str, url: str, headers: Mapping[str, str], size: int, timeouts: Timeouts, sink: Sink,
        into: memoryview | None = None,
    ) -> Response:
        time.sleep(delay)  # a worker thread, as a real transport would be
        sink(memoryview(data))
        return Response(200, received(data, into))

    stats = Stats()
    keep = KeepClient(slow_keep, stats=stats)
    route = KeepRoute("zbbbb", "v2/zbbbb-gj3su-000000000000000/x", (KeepService("zbbbb-bi6l4-0", "http://k/"),))
    for _ in range(2):
        await keep.get(parse_locator(f"{hashlib.md5(data).hexdigest()}+{len(data)}"), route)
    book = ThroughputBook.in_cache_dir(tmp_path)
    keep.meter.record_into(book)
    book.save()
    again = ThroughputBook.in_cache_dir(tmp_path)
    seen = again.get("zbbbb")
    assert seen.observed and seen.samples == 1 and again.get("zcccc").source == "default"
    assert seen.bytes_per_second == pytest.approx(2 * MiB / stats.get("keep_seconds", cluster="zbbbb"))
    assert seen.bytes_per_second < MiB / delay
