"""Progress display and human numbers (fake clocks, no sockets)."""

from __future__ import annotations

import io

import pytest

from fedmount.locality.progress import PLAIN_INTERVAL, Progress, human_bytes, human_duration

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
