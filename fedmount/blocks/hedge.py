"""Hedged Keep GETs: a request that has sent no byte yet gets a second one to the next replica.

A keepstore that answers its headers and then nothing costs a reader ``--keep-stall-timeout``
(15 s) before keep.py tries the next replica. Blocks are content-addressed, so any replica's
bytes are as good as any other's once their md5 matched: `Hedging.race` runs one round of
`KeepClient`'s attempts (its services in probe order) as follows.

1. Attempts start one after another in probe order, at most two at a time. When none is
   running, the next starts.
2. When exactly one is running and it has received no body byte ``delay`` seconds after it
   started, the next service in order gets a *hedge*: a second GET of the same block, if
   the budget allows (below). An attempt is considered for a hedge once, at its deadline.
3. The first attempt to succeed (a 200 whose md5 matched: keep.py decides) wins; the other
   is aborted (`transport.Abort`: its socket is shut down, so its blocking read returns)
   and the race ends once its worker thread has returned. An attempt that fails (an error,
   a bad md5) is recorded for keep.py and does not end the race while the other runs;
   then rule 1 or 2 applies again. If every attempt of the round failed, keep.py gets all
   their failures and goes on as without hedging (backoff, next round, `BlockError`).

Buffers. The caller's ``into`` (the mapping of the block's future cache file) is written by
one attempt at a time: an attempt receives into it only if no running attempt does; the
other receives into its own buffer, a second block-sized allocation (up to 64 MiB) that
lives only while it runs. If that one wins, the race first waits for the loser's thread to
return (it can no longer write) and then copies the winner's bytes into ``into``; the
second buffer is dropped when `race` returns. A loser never writes into the winner's buffer.

The delay, per cluster. ``--keep-hedge-after SECONDS`` fixes it; ``auto`` (the default) is
1.5 × the p95 (nearest rank) of the last 64 times to first byte of that cluster's GETs, at
least 0.5 s and at most min(stall / 3, 5 s) (the cap wins if stall < 1.5 s); 1 s (under the
same cap) until 8 times were measured. ``0`` or ``off`` disables hedging: only the stall
failover is left.

The budget, so that hedging can never double the load of a struggling federation: a hedge
starts only if, with it, the hedges of the last 30 s are at most 10 % of the requests of
the last 30 s (hedges included) plus 5. Beyond that there is no hedge, and a stalled attempt is
left to the stall timeout.

Only replicas of one route race. An auto-route ``+R`` block whose route has one service is
not hedged to the other way (home vs direct): the direct read already falls back to the
home when it fails, and racing routes would mix two rounds of different locators and tokens.

A loser that had received no byte when aborted is reported as stalled, so keep.py demotes
its service for the next blocks instead of hedging each of them.

Stats (labels ``cluster``): ``keep_hedges`` (hedges started), ``keep_hedge_wins`` (hedges
that won the race).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from fedmount.stats import Stats

from .transport import Abort

S = TypeVar("S")  # a service
T = TypeVar("T")  # a successful attempt's body
F = TypeVar("F")  # a failed attempt's record

SAMPLES = 64  # times to first byte kept per cluster
WARM = 8  # samples before the auto delay is used
WARM_DELAY = 1.0
FLOOR, CAP = 0.5, 5.0
WINDOW = 30.0  # seconds over which the budget counts requests and hedges
SHARE, EXTRA = 0.10, 5


@dataclass(eq=False)
class Contender(Generic[S]):
    """One attempt of a race: its service, where it receives, how to stop it, its first byte."""

    service: S
    into: memoryview | None  # the caller's buffer, or None: the attempt's own
    hedge: bool
    started: float = field(default_factory=time.monotonic)
    abort: Abort = field(default_factory=Abort)
    first_byte_at: float | None = None  # set by the worker thread
    considered: bool = False  # its hedge deadline has passed
    lost: bool = False  # another contender won while it ran

    def received(self) -> None:
        """Worker thread: a chunk of the body arrived."""
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()

    @property
    def stalled(self) -> bool:
        """It lost the race without having sent a byte."""
        return self.lost and self.first_byte_at is None


@dataclass
class Outcome(Generic[T, F]):
    won: bool
    body: T | None
    failures: list[F]


Attempt = Callable[[S, Contender[S]], Awaitable[tuple[T | None, F | None]]]  # (body, None) or (None, failure)


class Hedging:
    """The hedge policy of one KeepClient: delays per cluster, the budget, and `race`."""

    def __init__(
        self, after: float | None, stall: float, stats: Stats, clock: Callable[[], float] = time.monotonic
    ):
        self._after = after  # None: auto; 0: off
        self._cap = min(stall / 3, CAP)
        self._stats = stats
        self._clock = clock
        self._samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=SAMPLES))
        self._requests: deque[float] = deque()
        self._hedges: deque[float] = deque()

    def delay(self, cluster: str) -> float | None:
        """Seconds without a byte after which a GET to `cluster` is hedged; None: never."""
        if self._after is not None:
            return self._after or None
        samples = sorted(self._samples[cluster])
        if len(samples) < WARM:
            return min(WARM_DELAY, self._cap)
        p95 = samples[math.ceil(0.95 * len(samples)) - 1]
        return min(self._cap, max(FLOOR, 1.5 * p95))

    def first_byte(self, cluster: str, seconds: float) -> None:
        self._samples[cluster].append(seconds)

    def requested(self) -> None:
        """A request started (for the budget)."""
        self._requests.append(self._clock())

    def take_hedge(self) -> bool:
        """True, and the hedge counted, if the budget allows one more hedge now."""
        now = self._clock()
        for times in (self._requests, self._hedges):
            while times and times[0] <= now - WINDOW:
                times.popleft()
        if len(self._hedges) + 1 > SHARE * len(self._requests) + EXTRA:
            return False
        self._hedges.append(now)
        return True

    async def race(
        self, cluster: str, services: Sequence[S], into: memoryview | None, attempt: Attempt[S, T, F],
        *, hedge: bool,
    ) -> Outcome[T, F]:
        """One round over `services` (see the module docstring); `hedge` False: one at a time."""
        delay = self.delay(cluster) if hedge else None
        todo, running, failures = list(services), list[Contender[S]](), list[F]()
        winner: tuple[Contender[S], T | None] | None = None
        send, receive = trio.open_memory_channel[tuple[Contender[S], tuple[T | None, F | None]]](math.inf)

        async def run(contender: Contender[S]) -> None:
            send.send_nowait((contender, await attempt(contender.service, contender)))

        async with trio.open_nursery() as nursery:

            def start(as_hedge: bool) -> None:
                owns = into is not None and all(other.into is None for other in running)
                contender = Contender(todo.pop(0), into if owns else None, as_hedge)
                running.append(contender)
                self.requested()
                nursery.start_soon(run, contender)

            try:
                while winner is None and (todo or running):
                    if not running:
                        start(False)
                        continue
                    watched = running[0] if len(running) == 1 and todo and delay is not None else None
                    wait = math.inf
                    if watched is not None and not watched.considered:
                        wait = watched.started + delay - time.monotonic()  # type: ignore[operator]
                    with trio.move_on_after(max(0.0, wait)) as timer:
                        contender, (body, failure) = await receive.receive()
                    if timer.cancelled_caught:
                        assert watched is not None
                        watched.considered = True
                        if watched.first_byte_at is None and self.take_hedge():
                            self._stats.add("keep_hedges", cluster=cluster)
                            start(True)
                        continue
                    running.remove(contender)
                    if contender.first_byte_at is not None:
                        self.first_byte(cluster, contender.first_byte_at - contender.started)
                    if failure is None:
                        winner = (contender, body)
                        for loser in running:
                            loser.lost = True
                    else:
                        failures.append(failure)
            finally:  # decided, or cancelled from outside: stop the rest
                for contender in running:
                    contender.abort.abort()
        # Every worker thread has returned: nothing writes into `into` any more.
        if winner is None:
            return Outcome(False, None, failures)
        contender, body = winner
        if contender.hedge:
            self._stats.add("keep_hedge_wins", cluster=cluster)
        if into is not None and contender.into is None and body is not None:
            into[:] = body  # type: ignore[index]
            body = into  # type: ignore[assignment]
        return Outcome(True, body, failures)
