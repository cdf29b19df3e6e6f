"""The automatic route (``--route auto``): per remote cluster, its blocks directly or via the home.

In auto mode every record is fetched as in home mode (through the home controller, so
UUID and PDH lookups are exactly home mode's), and its manifest names a remote cluster's
blocks ``+R<cluster>-<sig>``. Such a block can be read two ways with the same signature:
from the home keepstore with the home token (it proxies), or from the remote's own keep
services with the token salted for that cluster and the hint turned back into ``+A``
(`fedmount.arvados.routes.direct_locator`, what the home keepstore itself sends). The
second skips the home's hop and verification; `AutoRoutes` decides, per cluster, whether
to take it. The home token never leaves the home: the direct route carries the salted token.

States of one cluster, and what `direct` answers:

- *undecided*: the first caller runs the trial, everyone else waits for its end (so one
  dead cluster costs one trial, not one per block in flight): the remote's
  ``keep_services/accessible``, asked with the salted token, at most ``trial_timeout``
  seconds. An answer makes the cluster *direct*; anything else (unreachable, refused, a
  token that cannot be salted) makes it *home*. `Federation` runs it when it loads a
  collection with blocks of that cluster, so the first read does not wait for it.
- *direct*: the route. The block reads along it are the probe: the first that fails
  (`failed`) is read again through the home by its caller, and the cluster becomes
  *home*. Reads in flight at that moment fail at most once each, together.
- *home*: None (through the home keepstore) until ``retry_at``, then *undecided* again.
  The wait doubles after each failure, from ``first_wait`` up to ``max_wait``, unless
  the cluster had been direct for longer than the current wait (then it starts over):
  a flapping cluster costs one failed read per wait, fewer and fewer, never every block
  twice. A cluster whose token cannot be salted, or that the home does not know, stays
  *home* for good.

`state` and `reason` (the last failure, one line) tell logs, tests and ``fedmount locate``
where a cluster's blocks go now and why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from fedmount.arvados.errors import ApiError, TokenNotSaltable, UnknownCluster
from fedmount.arvados.routes import KeepRoute

log = logging.getLogger("fedmount.route")

RouteSource = Callable[[str], Awaitable[KeepRoute]]  # cluster -> its own keep route, salted token


@dataclass
class _Cluster:
    route: KeepRoute | None = None  # set while direct
    direct_since: float = 0.0
    retry_at: float = 0.0  # while home: when to try direct again (inf: never)
    wait: float = 0.0  # the current wait after a failure
    reason: str = ""  # why it was last read through the home
    trial: trio.Event | None = field(default=None, repr=False)  # set when the running trial ends


class AutoRoutes:
    """`RemoteRoutes` of ``--route auto``: see the module docstring."""

    def __init__(
        self,
        source: RouteSource,
        *,
        first_wait: float = 30.0,
        max_wait: float = 900.0,
        trial_timeout: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._source = source
        self._first_wait = first_wait
        self._max_wait = max_wait
        self._trial_timeout = trial_timeout
        self._clock = clock
        self._clusters: dict[str, _Cluster] = {}

    def state(self, cluster: str) -> str:
        """"direct", "home" or "undecided", for logs and tests."""
        c = self._clusters.get(cluster)
        if c is None or (c.route is None and c.retry_at <= self._clock()):
            return "undecided"
        return "direct" if c.route is not None else "home"

    def reason(self, cluster: str) -> str:
        """Why `cluster`'s blocks went to the home last (one line, no token; "" if they never did)."""
        c = self._clusters.get(cluster)
        return c.reason if c is not None else ""

    async def direct(self, cluster: str) -> KeepRoute | None:
        c = self._clusters.setdefault(cluster, _Cluster())
        while c.trial is not None:
            await c.trial.wait()
        if c.route is not None or c.retry_at > self._clock():
            return c.route
        c.trial = trio.Event()
        try:
            with trio.move_on_after(self._trial_timeout) as scope:
                route, reason, for_good = await self._trial(cluster)
            if scope.cancelled_caught:
                route, reason, for_good = None, f"no answer in {self._trial_timeout:g} s", False
            if route is not None:
                c.route, c.direct_since = route, self._clock()
                log.info("auto route: reading cluster %s's blocks from its own keep services", cluster)
            else:
                self._to_home(cluster, c, reason, for_good=for_good)
        finally:
            c.trial.set()
            c.trial = None
        return c.route

    def failed(self, cluster: str, reason: str) -> None:
        c = self._clusters.get(cluster)
        if c is not None and c.route is not None:
            if self._clock() - c.direct_since >= c.wait:
                c.wait = 0.0  # it had worked for longer than the last wait: start over
            c.route = None
            self._to_home(cluster, c, reason)

    async def _trial(self, cluster: str) -> tuple[KeepRoute | None, str, bool]:
        """(the direct route or None, why not, whether for good)."""
        try:
            return await self._source(cluster), "", False
        except (TokenNotSaltable, UnknownCluster) as e:
            return None, e.message, True
        except ApiError as e:
            return None, f"its keep services: {e.message}", False

    def _to_home(self, cluster: str, c: _Cluster, reason: str, *, for_good: bool = False) -> None:
        c.reason = reason
        if for_good:
            c.retry_at = math.inf
            log.warning("auto route: reading cluster %s's blocks through the home cluster: %s",
                        cluster, reason)  # fmt: skip
            return
        c.wait = min(self._max_wait, c.wait * 2 if c.wait else self._first_wait)
        c.retry_at = self._clock() + c.wait
        log.warning("auto route: reading cluster %s's blocks through the home cluster for %g s: %s",
                    cluster, c.wait, reason)  # fmt: skip
