"""Progress display, human numbers, throughput book and transfer meter (fake clocks, no sockets)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fedmount.locality.estimate import (
    DEFAULT_BYTES_PER_SECOND,
    EWMA_WEIGHT,
    FILE_NAME,
    ThroughputBook,
    TransferMeter,
    record_keep_stats,
)
from fedmount.locality.progress import PLAIN_INTERVAL, Progress, human_bytes, human_duration
from fedmount.stats import Stats

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_human_numbers() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 12 * MiB, 3.25 * 1024 * MiB)] == [
        "0 B", "1023 B", "1.50 KiB", "12.0 MiB", "3.25 GiB",
    ]  # fmt: skip
    assert [human_duration(s) for s in (None, 0.2, 42, 187, 7500, 3 * 86400 + 4 * 3600)] == [
        "--", "<1s", "42s", "3m07s", "2h05m", "3d04h",
    ]  # fmt: skip


def test_plain_progress_prints_throttled_lines_with_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress(10 * MiB, 10, stream=out, tty=False, clock=clock)
    p.skip(2 * MiB, 2)  # already cached: done, but no rate
    assert out.getvalue().splitlines() == ["stage: 20%, 2.00 MiB of 10.0 MiB, -- /s, ETA --, 2/10 blocks, "
                                           "2.00 MiB already cached"]  # fmt: skip
    p.fetch_started()
    clock.now += 1
    p.advance(MiB)  # within PLAIN_INTERVAL of the last line: not printed
    assert len(out.getvalue().splitlines()) == 1
    clock.now += PLAIN_INTERVAL
    p.advance(MiB)
    last = out.getvalue().splitlines()[-1]
    rate = 2 * MiB / (1 + PLAIN_INTERVAL)
    assert p.rate() == pytest.approx(rate)
    assert f"{human_bytes(rate)}/s" in last and "40%" in last and "4/10 blocks" in last
    assert p.eta() == pytest.approx(6 * MiB / rate)
    p.fail()
    p.finish("done")
    assert out.getvalue().endswith("1 failed\ndone\n")


def test_tty_progress_redraws_one_line_with_a_bar() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress(4 * MiB, 4, stream=out, tty=True, clock=clock)
    p.fetch_started()
    clock.now += 1
    p.advance(2 * MiB)
    text = out.getvalue()
    assert text.startswith("\rstage [############............]  50%") and text.endswith("\x1b[K")
    assert "2.00 MiB/s" in text and "ETA 1s" in text and "\n" not in text
    p.finish()
    assert out.getvalue().endswith("\n")


def test_rate_window_forgets_old_samples() -> None:
    clock = Clock()
    p = Progress(100 * MiB, 100, stream=io.StringIO(), tty=False, clock=clock)
    p.fetch_started()
    for _ in range(10):  # fast for 10 s
        clock.now += 1
        p.advance(5 * MiB)
    for _ in range(20):  # then slow
        clock.now += 1
        p.advance(MiB // 4)
    assert p.rate() == pytest.approx(MiB / 4, rel=0.2)


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


def test_record_keep_stats_uses_the_keep_clients_counters() -> None:
    stats = Stats()
    stats.add("keep_bytes", 30 * MiB, cluster="zcccc")
    stats.add("keep_seconds", 3.0, cluster="zcccc")
    stats.add("keep_bad_md5", 1, cluster="zcccc", service="x")
    book = ThroughputBook(None)
    record_keep_stats(book, stats)
    assert book.get("zcccc").bytes_per_second == pytest.approx(10 * MiB)
    record_keep_stats(book, Stats())  # nothing measured: no change, no error
