"""API calls that outlive the file operation that asked for them, each with a deadline.

Loading a collection (a lookup under ``by_id/``) and re-checking a UUID collection ask a
cluster's API, and a cluster may be slow, down, or stalled: a connection that sends
nothing back holds the HTTP client for its whole retry budget (two 30 s read timeouts).
A file operation must not wait that long, and above all a lookup must not: the kernel
serializes lookups within one directory (see fuse.py: libfuse 3.14 never asks for
parallel directory operations), so under ``by_id/`` one lookup waiting on the API holds
every other lookup there.

So such a call runs in the background (`Calls.start`, in `Calls.nursery`) and a file
operation waits for it only until the call's *deadline* (`Call.wait`), ``wait`` seconds
after the call started. The call goes on after its deadline, and whoever asks next gets
its answer: a later lookup of the same collection joins the same call (or finds the
collection loaded), and a re-check that ends late makes the next operation see the new
generation. What an operation answers meanwhile is the caller's choice (tree.py: a
lookup ETIMEDOUT, a re-check the generation it has).

A cluster with a call past its deadline is *stalled*: a new call to it gets no wait at
all (its deadline is its start) until every overdue call of that cluster has ended. A
stalled cluster therefore costs its own collections' operations one ``wait`` in all, not
one each, and the lookups queued behind them in the kernel (other clusters' collections)
at most that one ``wait``. At most `MAX_CALLS_PER_CLUSTER` calls of one cluster run at a
time (the others queue for a slot), so a stalled cluster holds at most that many of the
API client's connections (100 in all, shared by every cluster in home mode) and cannot
starve the calls to the others.

Deadlines are on trio's clock, so tests may run them on a mock clock.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from fedmount import defaults
from fedmount.stats import Stats

from .errors import FsError

log = logging.getLogger("fedmount.fs")
T = TypeVar("T")
# --api-wait: longer than the API client's retries of a cluster that refuses or resets
# connections (at most 7.5 s of back-off), so a down cluster still answers with its error and
# only a stalled one is cut short.
DEFAULT_API_WAIT = defaults.API_WAIT
MAX_CALLS_PER_CLUSTER = 8


class Call(Generic[T]):
    """One background call: its deadline, then its value or its exception."""

    def __init__(self, what: str, started: float, deadline: float):
        self.what = what
        self.waited_for = deadline > started  # False: its cluster was stalled when it started
        self.deadline = deadline
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._waiting = 0  # operations waiting for it now: they will raise its exception
        self._late_noted = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def overdue(self) -> bool:
        return not self.done and trio.current_time() >= self.deadline

    async def wait(self) -> bool:
        """Wait until the call ends or its deadline passes; whether it ended."""
        self._waiting += 1
        try:
            with trio.move_on_at(self.deadline):
                await self._done.wait()
        finally:
            self._waiting -= 1
        return self.done

    def result(self) -> T:
        """The call's value, or its exception raised again (only once it is `done`)."""
        assert self.done, "result() of a call still running"
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def first_late_answer(self) -> bool:
        """True the first time it is asked: who answers without the call logs it once."""
        first, self._late_noted = not self._late_noted, True
        return first


class Calls:
    """Starts background calls per cluster, with the deadline the cluster's state allows."""

    def __init__(self, wait: float, quiet: tuple[type[Exception], ...] = ()):
        self.wait = wait
        self.quiet = quiet  # exceptions a call may end with that its work has logged already
        self.nursery: trio.Nursery | None = None  # set by whoever serves the tree
        self._running: dict[str, set[Call[object]]] = {}
        self._slots: dict[str, trio.Semaphore] = {}  # a cluster's, while it has calls

    def stalled(self, cluster: str) -> bool:
        return any(call.overdue for call in self._running.get(cluster, ()))

    def start(self, cluster: str, what: str, work: Callable[[], Awaitable[T]]) -> Call[T]:
        """Run `work` (an API call to `cluster`) in the background; its `Call`."""
        if self.nursery is None:
            raise RuntimeError("Calls.nursery is not set: the tree is not being served")
        now = trio.current_time()
        call: Call[T] = Call(what, now, now if self.stalled(cluster) else now + self.wait)
        self._running.setdefault(cluster, set()).add(call)  # type: ignore[arg-type]
        slots = self._slots.setdefault(cluster, trio.Semaphore(MAX_CALLS_PER_CLUSTER))
        self.nursery.start_soon(self._run, cluster, slots, call, work)
        return call

    async def _run(
        self, cluster: str, slots: trio.Semaphore, call: Call[T], work: Callable[[], Awaitable[T]]
    ) -> None:
        try:
            async with slots:
                call._value = await work()
        except Exception as e:  # kept for whoever asks; nothing escapes into the nursery
            call._error = e
            if not isinstance(e, self.quiet) and not call._waiting:  # else its waiters report it
                log.error("%s failed: %s: %s", call.what, type(e).__name__, e)
                log.debug("traceback of the %s failure", call.what, exc_info=True)
        except BaseException:  # cancelled: the daemon is stopping
            call._error = RuntimeError(f"{call.what} was cancelled")
            raise
        finally:
            running = self._running[cluster]
            running.discard(call)  # type: ignore[arg-type]
            if not running:  # no call of this cluster holds or awaits a slot
                del self._running[cluster], self._slots[cluster]
            call._done.set()


class JoinedCalls(Generic[T]):
    """Background calls by key: whoever asks for a key while its call runs joins that call
    (concurrent lookups of one name make one API call)."""

    def __init__(self, calls: Calls):
        self.calls = calls
        self._running: dict[Hashable, Call[T]] = {}

    def start(self, key: Hashable, cluster: str, what: str, work: Callable[[], Awaitable[T]]) -> Call[T]:
        call = self._running.get(key)
        if call is None:

            async def run() -> T:
                try:
                    return await work()
                finally:
                    self._running.pop(key, None)

            call = self._running[key] = self.calls.start(cluster, what, run)
        return call


async def answer_by_deadline(call: Call[T], calls: Calls, group: str, subject: str, stats: Stats,
                             op: str) -> T:
    """`call`'s answer, or ETIMEDOUT once it is past its deadline (logged once per call): it
    goes on, and whoever asks next gets its answer. `subject` names what is asked for (a
    collection, a project) in the message; `op` labels ``api_calls_late``."""
    if await call.wait():
        return call.result()
    wait = calls.wait
    why = f"within {wait:g}s" if call.waited_for else f"yet ({group} has requests pending past {wait:g}s)"
    message = f"{subject}: no answer from the API {why}; still asking, for the next lookup"
    if call.first_late_answer():
        stats.add("api_calls_late", op=op, cluster=group)
        log.warning("%s", message)
    raise FsError(errno.ETIMEDOUT, message)
