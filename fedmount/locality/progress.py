"""Progress display for long transfers (``fedmount stage``) and human-readable numbers.

`Progress` counts bytes and blocks done out of a known total. Blocks found already in
the cache count as done at once but never enter the rate, so a resumed stage shows the
real network rate and an honest ETA.

- Rate: bytes fetched over a sliding window (`WINDOW` seconds) of (time, bytes) samples,
  so a stall shows up as a falling rate within seconds; before the window fills it is the
  average since the first fetch started.
- ETA: remaining bytes / rate; unknown ("--") until something has been fetched.
- On a terminal: one line redrawn in place (``\\r`` + erase to end of line) at most every
  `TTY_INTERVAL` seconds, with a bar. Otherwise (a log file, CI, a pipe): one plain line
  every `PLAIN_INTERVAL` seconds, so logs stay short and greppable. `finish` always writes
  a final line.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

WINDOW = 10.0
TTY_INTERVAL = 0.2
PLAIN_INTERVAL = 5.0
BAR_WIDTH = 24


def human_bytes(n: float) -> str:
    """1023 B, 1.5 KiB, 12.0 MiB, 3.25 GiB ..."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.2f} {unit}" if n < 10 else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """'--' (unknown), '<1s', '42s', '3m07s', '2h05m', '3d04h'."""
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if seconds < 1:
        return "<1s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
    def __init__(
        self,
        total_bytes: int,
        total_blocks: int,
        *,
        label: str = "stage",
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_bytes = total_bytes
        self.total_blocks = total_blocks
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.done_bytes = 0
        self.done_blocks = 0
        self.skipped_bytes = 0
        self.fetched_bytes = 0
        self.failed_blocks = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._last_draw: float | None = None

    def skip(self, nbytes: int, blocks: int = 1) -> None:
        """Blocks that were already in the cache: done, but not part of the rate."""
        self.done_bytes += nbytes
        self.skipped_bytes += nbytes
        self.done_blocks += blocks
        self.draw()

    def fetch_started(self) -> None:
        if not self._samples:
            self._samples.append((self.clock(), 0))

    def advance(self, nbytes: int) -> None:
        """One block fetched and cached."""
        self.done_bytes += nbytes
        self.fetched_bytes += nbytes
        self.done_blocks += 1
        now = self.clock()
        if not self._samples:
            self._samples.append((now, 0))
        self._samples.append((now, self.fetched_bytes))
        while len(self._samples) > 2 and self._samples[1][0] < now - WINDOW:
            self._samples.popleft()
        self.draw()

    def fail(self) -> None:
        self.failed_blocks += 1
        self.draw()

    def rate(self) -> float | None:
        """Bytes per second over the window; None before anything was fetched."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        now = self.clock()
        span = max(now, t1) - t0
        return (b1 - b0) / span if span > 0 and b1 > b0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        remaining = self.total_bytes - self.done_bytes
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate else None

    def line(self) -> str:
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        rate = self.rate()
        parts = [
            f"{pct:3.0f}%" if self.tty else f"{pct:.0f}%",  # fixed width only where it is redrawn
            f"{human_bytes(self.done_bytes)} of {human_bytes(self.total_bytes)}",
            f"{human_bytes(rate)}/s" if rate else "-- /s",
            f"ETA {human_duration(self.eta())}",
            f"{self.done_blocks}/{self.total_blocks} blocks",
        ]
        if self.skipped_bytes:
            parts.append(f"{human_bytes(self.skipped_bytes)} already cached")
        if self.failed_blocks:
            parts.append(f"{self.failed_blocks} failed")
        if self.tty:
            filled = int(BAR_WIDTH * pct / 100)
            return f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " + "  ".join(parts)
        return f"{self.label}: " + ", ".join(parts)

    def draw(self, force: bool = False) -> None:
        now = self.clock()
        interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        if not force and self._last_draw is not None and now - self._last_draw < interval:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self, message: str | None = None) -> None:
        """Final state, then `message` (if any) on its own line."""
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
